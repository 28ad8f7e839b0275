"""Send images to the running server and compare with the true label (the image's folder name).

python -m deploy.predict data/digits/val/3/0012.png data/digits/val/7/*.png [--version 2.0]
python -m deploy.predict --raw data/digits/val/3/0012.png     # the server's JSON answer only (predict.sh)

TS_KEY_FILE (another server's key_file.json) and TS_INFERENCE_URL point it at another server than the
demo one (the tests use their own). Keys are read from key_file.json and an expired one is refreshed
through the token API, so no key ever appears on a command line.
"""

import argparse
import os
import sys
import urllib.parse

import requests

from deploy import settings
from deploy.server import ServerError, TorchServe, ports_from_config


def top1(answer: dict) -> str:
    """The label of an answer {label: probability}: the most probable one, whatever the key order."""
    return max(answer, key=lambda label: answer[label])


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
    with open(path, "rb") as f:
        return f.read()


LOOPBACK = ("localhost", "::1")


def is_loopback(host: str) -> bool:
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
            raise SystemExit(f"TS_KEY_FILE={key_file}: name the key_file.json a TorchServe wrote (it refreshes it)")
        if os.path.exists(ts.generated_config):  # the ports it was started on: management answers refreshes
            ts.ports = ports_from_config(ts.generated_config)
    if os.environ.get("TS_INFERENCE_URL"):
        url = urllib.parse.urlsplit(os.environ["TS_INFERENCE_URL"])
        if url.scheme not in ("http", "https") or not url.hostname:
            raise SystemExit(f"TS_INFERENCE_URL={url.geturl()}: give http(s)://HOST:PORT")
        if url.scheme == "http" and not is_loopback(url.hostname) and os.environ.get("TS_ALLOW_PLAIN_HTTP") != "1":
            raise SystemExit(
                f"refusing to send the inference key to {url.hostname} over plain HTTP (anyone on the way reads "
                "it): use the HTTPS front door, or set TS_ALLOW_PLAIN_HTTP=1 if you mean it"
            )
        ts.scheme, ts.host = url.scheme, url.hostname
        ts.ports.inference = url.port or (443 if url.scheme == "https" else ts.ports.inference)
    return ts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default=settings.MODEL_NAME)
    p.add_argument("--version", default=None, help="default version when omitted")
    p.add_argument("--summary", action="store_true", help="print only the accuracy (e.g. for a whole val set)")
    p.add_argument("--raw", action="store_true", help="print only each answer's body, as the server sent it")
    args = p.parse_args(argv)
    ts = target()
    try:
        return run(ts, args)
    except requests.ConnectionError:
        raise SystemExit(f"predict: no answer from {ts.url()}: is TorchServe running? (serve.sh start)") from None
    except ServerError as e:
        raise SystemExit(f"predict: {e}") from None


def run(ts: TorchServe, args) -> int:
    if args.raw:
        failed = 0
        for path in args.images:
            resp = post(ts, read_bytes(path), args.model, args.version)
            print(resp.text)
            failed += resp.status_code != 200
        return 1 if failed else 0
    right = failed = 0
    print(f"/predictions/{args.model}" + (f"/{args.version}" if args.version else "") + ":")
    for path in args.images:
        resp = post(ts, read_bytes(path), args.model, args.version)
        body, truth = resp.json(), os.path.basename(os.path.dirname(path))
        if resp.status_code != 200:
            print(f"  {path}: HTTP {resp.status_code} {body.get('message', body)}")
            failed += 1
            continue
        label = top1(body)
        right += label == truth
        if not args.summary or label != truth:
            print(
                f"  {path}: true {truth}  predicted {label} ({body[label]:.3f}) {'ok' if label == truth else 'WRONG'}"
            )
    print(f"  {right}/{len(args.images)} correct (accuracy {right / len(args.images):.4f}), {failed} failed requests")
    return 1 if failed else 0  # a wrong label is information; a failed request is an error


if __name__ == "__main__":
    sys.exit(main())
