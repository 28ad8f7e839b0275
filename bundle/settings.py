"""Where things are and what they are called: the one home for the bundle's paths, default model name
and ports. Every path is absolute (anchored at the repository root), so code resolves them the same
from any working directory; paths a user types on a command line stay relative to where they typed."""

import os
import socket
from dataclasses import dataclass

from bundle.properties import read_properties

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(ROOT, "config.properties")  # TorchServe's config (ports, limits, security)
MODEL_STORE = os.path.join(ROOT, "model_store")  # archives (.mar + .sha256); the only registration source
DATA_DIR = os.path.join(ROOT, "data")
DIGITS_DIR = os.path.join(DATA_DIR, "digits")  # the bundled default dataset
RUNS_DIR = os.path.join(ROOT, "runs")  # training runs: checkpoints, metrics, golden sets
# the live server's own folder (0700): key_file.json, logs/, tmp/, state/
SERVER_DIR = os.path.join(ROOT, "server")
MODEL_SRC = os.path.join(ROOT, "model_src")  # exactly what every archive ships
HANDLER = os.path.join(ROOT, "handlers", "image_classifier.py")
# per-model workers, batching, handler limits
MODEL_CONFIG = os.path.join(ROOT, "handlers", "model-config.yaml")
METRICS_CONFIG = os.path.join(ROOT, "serving", "metrics.yaml")
LOG_CONFIG = os.path.join(ROOT, "serving", "log4j2.xml")  # the frontend's log4j2 (config.properties vmargs)
BENCH_RESULTS = os.path.join(ROOT, "bench_results")
SOAK_RESULTS = os.path.join(ROOT, "soak_results")
# the TLS front door's own folder (0700): certificates, config, log
FRONT_DOOR_DIR = os.path.join(ROOT, "frontdoor")

MODEL_NAME = "my_model"
# Started as root, TorchServe runs as this unprivileged user (scripts/setup.sh creates it): a model's handler
# is code, and a registered model must never run as root.
SERVICE_USER = "torchserve"
FRONT_DOOR_PORT = (
    8443  # the HTTPS front door (deploy/frontdoor.py): with the next, the ports that listen beyond loopback
)
# the front door's gRPC listener (TLS, HTTP/2: KServe v2 gRPC), only when the OIP gRPC proxy is on
FRONT_DOOR_GRPC_PORT = 7443


GUARD_KEY = "guarded_management_address"  # in a generated config: where the management guard listens
# in config.properties: the port of deploy/oip_grpc.py (KServe v2 gRPC for stock clients)
OIP_GRPC_KEY = "oip_grpc_port"


@dataclass
class Ports:
    """The ports of one TorchServe (the first five are TorchServe's, with its defaults) and of its OIP gRPC
    proxy (deploy/oip_grpc.py, used only with ts_open_inference_protocol=true)."""

    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071
    oip_grpc: int = 7072

    @classmethod
    def free(cls) -> "Ports":
        """Ports the OS says are free right now (for tests and side-by-side servers)."""
        socks = [socket.socket() for _ in range(6)]
        try:
            for s in socks:
                s.bind(("127.0.0.1", 0))
            return cls(*[s.getsockname()[1] for s in socks])
        finally:
            for s in socks:
                s.close()


def ports(path: str = CONFIG) -> Ports:
    """The ports a config.properties gives (the demo server's: 8080/8081/8082, gRPC 7070/7071); in a generated
    config, the management port is the guard's."""
    props = read_properties(path)
    port = lambda key, default: int(props.get(key, f":{default}").rsplit(":", 1)[1])
    return Ports(
        port("inference_address", 8080),
        port(GUARD_KEY if GUARD_KEY in props else "management_address", 8081),
        port("metrics_address", 8082),
        int(props.get("grpc_inference_port", 7070)),
        int(props.get("grpc_management_port", 7071)),
        int(props.get(OIP_GRPC_KEY, 7072)),
    )
