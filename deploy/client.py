"""The HTTP client of a running TorchServe's inference API, shared by the `predict` CLI (deploy/predict.py),
the promotion gate, serve.sh and the benchmarks: which server to talk to (TS_KEY_FILE, TS_INFERENCE_URL), how
an image is posted and how an answer is read."""

import os
import urllib.parse

from bundle import settings
from bundle.settings import ports
from deploy.errors import UsageError
from deploy.server import TorchServe


def top1(answer: dict) -> str:
    """The label of an answer {label: probability}: the most probable one, whatever the key order."""
    return max(answer, key=lambda label: answer[label])


def is_probability(value) -> bool:
    """Whether a label map's value has a probability's type: int or float, not bool (JSON true)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def post(ts: TorchServe, data: bytes, model: str = settings.MODEL_NAME, version: str | None = None, **kw):
    """POST one encoded image to /predictions/{model}[/{version}]."""
    return ts.request(
        "POST",
        "inference",
        f"/predictions/{model}" + (f"/{version}" if version else ""),
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        **kw,
    )


def read_bytes(path: str) -> bytes:
    """The bytes of the file at `path` (an image to post)."""
    with open(path, "rb") as f:
        return f.read()


LOOPBACK = ("localhost", "::1")


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine's loopback (localhost, ::1, 127.x.x.x): plain HTTP to it never leaves
    the machine."""
    return host in LOOPBACK or host.startswith("127.")


def target() -> TorchServe:
    """The demo server, or the one TS_KEY_FILE / TS_INFERENCE_URL name.

    Keys stay with their server: the management and API keys only ever go to the key file's own server on
    this machine (refreshes included), and the inference key goes to TS_INFERENCE_URL only over HTTPS or
    loopback, unless TS_ALLOW_PLAIN_HTTP=1 says plain HTTP to that host is meant."""
    key_file = os.environ.get("TS_KEY_FILE")
    ts = TorchServe()
    if key_file:  # a server's key_file.json lies in its folder's home/, beside logs/
        ts = TorchServe(workdir=TorchServe.workdir_of(key_file))
        if os.path.basename(key_file) != "key_file.json":
            raise UsageError(
                f"TS_KEY_FILE={key_file}: name the key_file.json a TorchServe wrote (it refreshes it)"
            )
        if os.path.exists(ts.generated_config):  # the ports it was started on: management answers refreshes
            ts.ports = ports(ts.generated_config)
    if os.environ.get("TS_INFERENCE_URL"):
        url = urllib.parse.urlsplit(os.environ["TS_INFERENCE_URL"])
        if url.scheme not in ("http", "https") or not url.hostname:
            raise UsageError(f"TS_INFERENCE_URL={url.geturl()}: give http(s)://HOST:PORT")
        if (
            url.scheme == "http"
            and not is_loopback(url.hostname)
            and os.environ.get("TS_ALLOW_PLAIN_HTTP") != "1"
        ):
            raise UsageError(
                f"refusing to send the inference key to {url.hostname} over plain HTTP (anyone on the way "
                "reads it): use the HTTPS front door, or set TS_ALLOW_PLAIN_HTTP=1 if you mean it"
            )
        ts.scheme, ts.host = url.scheme, url.hostname
        ts.ports.inference = url.port or (443 if url.scheme == "https" else ts.ports.inference)
    return ts
