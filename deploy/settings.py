"""Where things are and what they are called: the one home for the bundle's paths, default model name
and ports. Every path is absolute (anchored at the repository root), so code resolves them the same
from any working directory; paths a user types on a command line stay relative to where they typed."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(ROOT, "config.properties")  # TorchServe's config (ports, limits, security)
MODEL_STORE = os.path.join(ROOT, "model_store")  # archives (.mar + .sha256); the only registration source
DATA_DIR = os.path.join(ROOT, "data")
DIGITS_DIR = os.path.join(DATA_DIR, "digits")  # the bundled default dataset
RUNS_DIR = os.path.join(ROOT, "runs")  # training runs: checkpoints, metrics, golden sets
SERVER_DIR = os.path.join(ROOT, "server")  # the live server's own folder (0700): key_file.json, logs/, tmp/, state/
MODEL_SRC = os.path.join(ROOT, "model_src")  # exactly what every archive ships
HANDLER = os.path.join(ROOT, "handlers", "image_classifier.py")
MODEL_CONFIG = os.path.join(ROOT, "handlers", "model-config.yaml")  # per-model workers, batching, handler limits
METRICS_CONFIG = os.path.join(ROOT, "serving", "metrics.yaml")
LOG_CONFIG = os.path.join(ROOT, "serving", "log4j2.xml")  # the frontend's log4j2 (config.properties vmargs)
BENCH_RESULTS = os.path.join(ROOT, "bench_results")
SOAK_RESULTS = os.path.join(ROOT, "soak_results")
FRONT_DOOR_DIR = os.path.join(ROOT, "frontdoor")  # the TLS front door's own folder (0700): certificates, config, log

MODEL_NAME = "my_model"
# Started as root, TorchServe runs as this unprivileged user (scripts/setup.sh creates it): a model's handler is
# code, and a registered model must never run as root.
SERVICE_USER = "torchserve"
FRONT_DOOR_PORT = 8443  # the HTTPS front door (deploy/frontdoor.py): the one port that listens beyond loopback


def ports():
    """The ports config.properties gives the demo server (8080/8081/8082, gRPC 7070/7071)."""
    from deploy.server import ports_from_config

    return ports_from_config(CONFIG)
