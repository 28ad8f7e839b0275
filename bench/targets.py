"""What the benchmark serves: each target is a checkpoint, request images and where they came from."""

import os

from bundle import settings


def digits_target(checkpoint: str, work: str) -> dict:
    """The digits target: the checkpoint (trained here first if missing) and every third validation
    image."""
    from train.data import write_digits

    val = os.path.join(write_digits(), "val")
    if not os.path.exists(checkpoint):
        print(f"{checkpoint} missing: training a digits model for the benchmark (about a minute)")
        from train.train import get_args_parser as train_args
        from train.train import main as train_main

        out = os.path.join(work, "digits_run")
        train_main(
            train_args().parse_args(["--output-dir", out, "--quiet", "--no-tensorboard", "--no-plots"])
        )
        checkpoint = os.path.join(out, "checkpoint_best.pt")
    images = sorted(
        os.path.join(val, c, f)
        for c in sorted(os.listdir(val))
        for f in sorted(os.listdir(os.path.join(val, c)))
    )
    return {"name": "digits", "checkpoint": checkpoint, "images": images[::3], "data": settings.DIGITS_DIR}


def imagenet_target(work: str) -> dict:
    """EfficientNet-Lite0 with its published ImageNet weights at 224x224, on crops of real photos."""
    from deploy.import_pretrained import import_weights, write_photos

    data = write_photos()
    ckpt = os.path.join(work, "imagenet.pt")
    import_weights("efficientnet_lite0", ckpt, data)
    val = os.path.join(data, "val")
    images = sorted(
        os.path.join(val, c, f)
        for c in sorted(os.listdir(val))
        for f in sorted(os.listdir(os.path.join(val, c)))
    )
    return {"name": "imagenet", "checkpoint": ckpt, "images": images[::3], "data": data}


TARGETS = {"digits": digits_target, "imagenet": imagenet_target}  # digits takes its checkpoint too
