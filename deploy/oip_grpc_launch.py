"""Start, find and stop deploy/oip_grpc.py (KServe v2 gRPC for stock clients) beside one TorchServe, under
deploy/supervise.py like the management guard: a proxy that crashed or was killed is started again on the
same port (docs/kserve.md). deploy/server.py calls these with its TorchServe object when
ts_open_inference_protocol is on.
"""

import json
import os
import sys

import psutil
import yaml

from bundle import settings
from deploy import frontdoor, process
from deploy.errors import ServerError
from deploy.privileges import ids, write_new


def models_file(ts) -> str:
    """The archives' v2 metadata the proxy reads (root's run/ folder, readable by the server's group)."""
    return ts.path("run", "oip_models.json")


def host(ts) -> str:
    """Where the proxy listens: TorchServe's gRPC inference host (its port is ports.oip_grpc)."""
    return ts.config().get("grpc_inference_address", "127.0.0.1")


def command(ts) -> list[str]:
    """The proxy's command line for `ts`: listen on ports.oip_grpc at TorchServe's gRPC inference host,
    re-issue to TorchServe's gRPC inference port, with its max_request_size and the handler's images per
    request."""
    props, at = ts.config(), host(ts)
    cmd = [sys.executable, "-m", "deploy.oip_grpc", "--listen", f"{at}:{ts.ports.oip_grpc}"]
    cmd += ["--upstream", f"{at}:{ts.ports.grpc_inference}", "--models", models_file(ts)]
    with open(settings.MODEL_CONFIG) as f:  # the handler's images per request, as archives ship it
        max_images = yaml.safe_load(f)["handler"]["max_images_per_request"]
    cmd += ["--max-message", props.get("max_request_size", "6553500"), "--max-elements", str(max_images)]
    return cmd + ["--watch-pid", str(ts.pid() or 0), "--held"]


def launch(ts):
    """Start the proxy, detached, as the server's user, under deploy/supervise.py (which restarts it when it
    dies while TorchServe runs), and wait until it listens; ServerError when it does not within 30 s."""
    mode, group = (0o640, ids(ts.user)[1]) if ts.user else (0o600, -1)
    write_new(models_file(ts), json.dumps(frontdoor.oip_models(ts.model_store)).encode(), mode, group)
    supervised = [sys.executable, "-m", "deploy.supervise", "--watch-pid", str(ts.pid() or 0)]
    supervised += ["--hold-port", f"{host(ts)}:{ts.ports.oip_grpc}"]  # no other user can take it
    ts.detach([*supervised, "--", *command(ts)], "oip_grpc.log")
    wait(ts, 30)


def wait(ts, timeout: float):
    """Until a proxy of `ts` runs and its port accepts connections; ServerError after `timeout` s."""
    at = host(ts)
    listening = lambda: processes(ts)[1] != [] and frontdoor.listening(at, ts.ports.oip_grpc)
    hint = f"see {os.path.join(ts.log_dir, 'oip_grpc.log')}"
    process.wait_until(listening, timeout, "OIP gRPC proxy", hint=hint, error=ServerError)


def processes(ts) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(supervisors, proxies) of `ts`: processes of the server's user whose command line runs that module and
    names this server's models file (process.supervised)."""
    return process.supervised(ts.uid, models_file(ts), "deploy.oip_grpc")


def stop(ts, timeout: float = 5) -> bool:
    """Stop the proxy of `ts` and its supervisor (process.stop_supervised); False when none ran."""
    return process.stop_supervised(lambda: processes(ts), timeout)
