"""TorchServe's management API: the one place that knows its URLs, its answers and its quirks.

Every function takes a `TorchServe` (deploy/server.py), which carries the address and the keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlencode

from deploy.errors import DeployError
from deploy.process import wait_until

if TYPE_CHECKING:  # for the annotations only: server.py calls this module (start waits for READY workers)
    from deploy.server import TorchServe


def call(ts: TorchServe, method: str, path: str, ok=(200,), **kw):
    """One management call -> its parsed JSON ({} for an empty body); DeployError with TorchServe's
    message."""
    resp = ts.request(method, "management", path, **kw)
    if resp.status_code not in ok:
        try:
            message = resp.json().get("message", resp.text)
        except ValueError:
            message = resp.text
        raise DeployError(f"{method} {path.split('?')[0]} answered {resp.status_code}: {message.strip()}")
    return resp.json() if resp.text.strip() else {}


def model_names(ts: TorchServe) -> list[str]:
    """The names of the registered models (GET /models: one page, at TorchServe's default limit)."""
    return [m["modelName"] for m in call(ts, "GET", "/models")["models"]]


def versions(ts: TorchServe, model: str) -> list[dict]:
    """Describe entries of every registered version of `model` ([] when it is not registered)."""
    resp = ts.request("GET", "management", f"/models/{model}/all")
    return resp.json() if resp.status_code == 200 else []


def models(ts: TorchServe) -> dict[str, list[dict]]:
    """{model name: describe entries of its versions}."""
    return {name: versions(ts, name) for name in model_names(ts)}


def describe(ts: TorchServe, model: str, version: str | None = None) -> dict | None:
    """The describe entry of one version (the default one when version is None), or None."""
    resp = ts.request("GET", "management", f"/models/{model}" + (f"/{version}" if version else ""))
    return resp.json()[0] if resp.status_code == 200 else None


def default_version(ts: TorchServe, model: str) -> str | None:
    """The version `model` serves by default, None when it is not registered: read from /models/{name}, which
    describes the default version (0.12's /all listing does not flag it)."""
    desc = describe(ts, model)
    return desc["modelVersion"] if desc else None


def ready_workers(desc: dict) -> int:
    """How many workers of a describe entry are READY."""
    return sum(w["status"] == "READY" for w in desc["workers"])


def all_ready(ts: TorchServe) -> bool:
    """Every registered version has at least its minimum of READY workers. /ping turns healthy before a
    worker has finished loading its model: READY workers are the real signal."""
    return all(
        ready_workers(v) >= v["minWorkers"]
        for entries in models(ts).values()
        for v in entries
        if v["minWorkers"] > 0
    )


def register(ts: TorchServe, url: str, workers: int = 1, timeout: float = 300, **params) -> dict:
    """POST /models for an archive in the model store (url = its file name); returns when it is loaded.

    `workers` (initial_workers) is only a fallback: TorchServe 0.12 starts the minWorkers/maxWorkers of the
    archive's model-config.yaml whenever it sets both, as every archive built here does (docs/serving.md)."""
    query = urlencode({"url": url, "initial_workers": workers, "synchronous": "true", **params})
    return call(ts, "POST", f"/models?{query}", timeout=timeout)


def set_default(ts: TorchServe, model: str, version: str):
    """Make `version` the version /predictions/{model} serves; DeployError with TorchServe's message when it
    refuses."""
    call(ts, "PUT", f"/models/{model}/{version}/set-default")


def unregister(ts: TorchServe, model: str, version: str):
    """Unregister `version` of `model`; DeployError with TorchServe's message when it refuses."""
    call(ts, "DELETE", f"/models/{model}/{version}")


def scale(ts: TorchServe, model: str, version: str, workers: int, timeout: float = 300):
    """Give `version` exactly `workers` workers (min and max), waiting up to `timeout` s for TorchServe to
    answer; DeployError when it refuses."""
    query = urlencode({"min_worker": workers, "max_worker": workers, "synchronous": "true"})
    call(ts, "PUT", f"/models/{model}/{version}?{query}", ok=(200, 202), timeout=timeout)


def wait_ready(ts: TorchServe, model: str, version: str, timeout: float = 180):
    """Wait until `model` `version` has a READY worker (NotReady, a ServerError, when it has none in time)."""

    def ready() -> bool | str:
        desc = describe(ts, model, version)
        return bool(desc and ready_workers(desc)) or "no READY worker"

    wait_until(ready, timeout, f"{model} {version}", hint="see logs/model_log.log")


def ready_pids(ts: TorchServe, model: str, version: str) -> list[int]:
    """Process ids of the READY workers of one version ([] when none is READY or it is not registered)."""
    desc = describe(ts, model, version)
    return sorted(w["pid"] for w in desc["workers"] if w["status"] == "READY") if desc else []
