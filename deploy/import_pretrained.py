"""Serve a published pretrained model beside my_model: import its weights, archive it, register it.

    python -m deploy.import_pretrained                      # EfficientNet-Lite0 (ImageNet) as model
                                                            # `imagenet` 1.0

Steps, each reused when its output exists (nothing is overwritten):
  1. data/photos/: real photos that scikit-image and scikit-learn ship, as full JPEGs (samples/) and as an
     ImageFolder of crops (val/), on which the export checks compare the archive with the eager model;
  2. runs/<model>/checkpoint.pt: the published weights in this bundle's checkpoint format (train.pretrained);
  3. model_store/<model>.mar (+ .sha256), ONNX by default;
  4. registered as <model> <version> on the running server (its first version is default by itself).
"""

import argparse
import os
import sys

from bundle import settings
from deploy import backend_choice, management, versions
from deploy.archive import archive_checkpoint, archive_name
from deploy.server import ServerError, TorchServe
from model_src import backends
from model_src.manifest import Manifest

PHOTOS_DIR = os.path.join(settings.DATA_DIR, "photos")
# One request per batch for a 224-px model: batching buys it little (ONNX Runtime 7.5 ms/image alone, 7.8 at
# batch 4), and a batch that holds an explanation holds its neighbours' predictions for the whole Integrated
# Gradients run. Measured with 8 clients explaining for 30 s behind the front door's explanation lane:
# imagenet predictions' p99 7.9 s at batchSize 4, 0.58 s at 1 (docs/frontdoor.md).
BATCH_SIZE = 1


def write_photos(root: str = PHOTOS_DIR) -> str:
    """Full photos in <root>/samples/*.jpg and crops in <root>/{train,val}/<photo>/ (written once)."""
    from train.photos import load_photos, write_photo_crops

    if not os.path.isdir(os.path.join(root, "val")):
        write_photo_crops(root)
    samples = os.path.join(root, "samples")
    if not os.path.isdir(samples):
        os.makedirs(samples + ".tmp", exist_ok=True)
        for name, img in load_photos().items():
            img.convert("RGB").save(os.path.join(samples + ".tmp", f"{name}.jpg"), quality=92)
        os.replace(samples + ".tmp", samples)
    return root


def import_weights(arch: str, checkpoint: str, photos: str):
    """Import `arch`'s published weights as this bundle's checkpoint at `checkpoint` (reused when it exists),
    with `photos` as the images its export checks run on; prints what it did."""
    from train.pretrained import import_checkpoint, write_new

    if os.path.exists(checkpoint):
        print(f"reusing {os.path.relpath(checkpoint)}")
        return
    ckpt = import_checkpoint(arch, data=photos)  # the export checks run on these real photos
    write_new(ckpt, checkpoint)
    classes = len(Manifest.from_checkpoint(ckpt).class_names)
    print(f"imported {arch} ({classes} classes) -> {os.path.relpath(checkpoint)}")


def main(argv=None) -> int:
    """Import, archive and register the pretrained model the options name on the running server (see the
    module docstring); 0 on success, 1 with the error printed."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--model", default="imagenet", help="model name on the server")
    p.add_argument("--version", default="1.0")
    p.add_argument(
        "--backend",
        default=backend_choice.AUTO,
        choices=[backend_choice.AUTO, *sorted(backends.served())],
        help="auto: the fastest backend that passes export's checks, measured here (backend_choice.py)",
    )
    args = p.parse_args(argv)
    ts = TorchServe()
    if not ts.is_running():
        print("error: TorchServe is not running; start it with scripts/serve.sh start", file=sys.stderr)
        return 1
    photos = write_photos()
    checkpoint = os.path.join(settings.RUNS_DIR, args.model, "checkpoint.pt")
    archive = os.path.join(settings.MODEL_STORE, archive_name(args.model, args.version))
    try:
        import_weights(args.arch, checkpoint, photos)
        if os.path.exists(archive):
            print(f"reusing {os.path.relpath(archive)}")
        else:
            info = archive_checkpoint(
                checkpoint, args.version, args.backend, model_name=args.model, batch_size=BATCH_SIZE
            )
            check = info["export"]["formats"][info["backend"]]["max_diff"]
            print(
                f"archived {os.path.relpath(archive)} ({info['backend']}, max |Δprob| vs eager {check:.1e})"
            )
        if any(v["modelVersion"] == args.version for v in management.versions(ts, args.model)):
            print(f"{args.model} {args.version} is already registered")
        else:
            versions.register(ts, archive, model=args.model)
            print(f"registered {args.model} {args.version}")
    except (ServerError, FileExistsError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sample = os.path.relpath(os.path.join(photos, "samples", "chelsea.jpg"))
    print(
        f"try: scripts/serve.sh header | curl -H @- -T {sample} "
        f"http://127.0.0.1:{ts.ports.inference}/predictions/{args.model}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
