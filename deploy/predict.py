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

import requests

from bundle import settings
from deploy.client import post, read_bytes, target, top1
from deploy.errors import ServerError, UsageError
from deploy.server import TorchServe


def main(argv=None) -> int:
    """The `predict` command line (see the module docstring): 0 when every request was answered, 1 when one
    failed; SystemExit when the server cannot be reached or used."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default=settings.MODEL_NAME)
    p.add_argument("--version", default=None, help="default version when omitted")
    p.add_argument(
        "--summary", action="store_true", help="print only the accuracy (e.g. for a whole val set)"
    )
    p.add_argument("--raw", action="store_true", help="print only each answer's body, as the server sent it")
    args = p.parse_args(argv)
    try:
        ts = target()
    except UsageError as e:
        raise SystemExit(f"predict: {e}") from None
    try:
        return run(ts, args)
    except requests.ConnectionError:
        raise SystemExit(
            f"predict: no answer from {ts.url()}: is TorchServe running? (serve.sh start)"
        ) from None
    except ServerError as e:
        raise SystemExit(f"predict: {e}") from None


def run(ts: TorchServe, args) -> int:
    """Post each of `args.images` and print the answers (raw, or against each image's folder name with the
    accuracy); 1 when a request failed, else 0."""
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
                f"  {path}: true {truth}  predicted {label} ({body[label]:.3f}) "
                f"{'ok' if label == truth else 'WRONG'}"
            )
    print(
        f"  {right}/{len(args.images)} correct (accuracy {right / len(args.images):.4f}), {failed} "
        "failed requests"
    )
    return 1 if failed else 0  # a wrong label is information; a failed request is an error


if __name__ == "__main__":
    sys.exit(main())
