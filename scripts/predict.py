"""Send images to the running server and compare with the true label (the image's folder name).

python -m scripts.predict data/digits/val/3/0012.png data/digits/val/7/*.png [--version 2.0]
"""

import argparse
import os
import sys

from scripts.server import TorchServe


def predict(ts: TorchServe, path: str, model: str = "my_model", version: str | None = None):
    with open(path, "rb") as f:
        resp = ts.request(
            "POST",
            "inference",
            f"/predictions/{model}" + (f"/{version}" if version else ""),
            data=f.read(),
            headers={"Content-Type": "application/octet-stream"},
        )
    return resp.status_code, resp.json()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default="my_model")
    p.add_argument("--version", default=None, help="default version when omitted")
    p.add_argument("--summary", action="store_true", help="print only the accuracy (e.g. for a whole val set)")
    args = p.parse_args(argv)
    ts = TorchServe()
    right = failed = 0
    where = f"/predictions/{args.model}" + (f"/{args.version}" if args.version else "")
    print(f"{where}:")
    for path in args.images:
        status, body = predict(ts, path, args.model, args.version)
        truth = os.path.basename(os.path.dirname(path))
        if status != 200:
            print(f"  {path}: HTTP {status} {body.get('message', body)}")
            failed += 1
            continue
        label, prob = next(iter(body.items()))
        right += label == truth
        if not args.summary or label != truth:
            print(f"  {path}: true {truth}  predicted {label} ({prob:.3f}) {'ok' if label == truth else 'WRONG'}")
    print(f"  {right}/{len(args.images)} correct (accuracy {right / len(args.images):.4f}), {failed} failed requests")
    return 1 if failed else 0  # a wrong label is information; a failed request is an error


if __name__ == "__main__":
    sys.exit(main())
