"""What the benchmark serves: each target is a checkpoint, request images and where they came from."""

import os

import torch

from deploy import settings


def digits_target(checkpoint: str, work: str) -> dict:
    from train.data import write_digits

    val = os.path.join(write_digits(), "val")
    if not os.path.exists(checkpoint):
        print(f"{checkpoint} missing: training a digits model for the benchmark (about a minute)")
        from train.train import get_args_parser as train_args
        from train.train import main as train_main

        out = os.path.join(work, "digits_run")
        train_main(train_args().parse_args(["--output-dir", out, "--quiet", "--no-tensorboard", "--no-plots"]))
        checkpoint = os.path.join(out, "checkpoint_best.pt")
    images = sorted(
        os.path.join(val, c, f) for c in sorted(os.listdir(val)) for f in sorted(os.listdir(os.path.join(val, c)))
    )
    return {"name": "digits", "checkpoint": checkpoint, "images": images[::3], "data": settings.DIGITS_DIR}


PHOTO_CROPS = {"left": (0, 0, 400, 427), "right": (240, 0, 640, 427), "middle": (100, 27, 500, 427)}


def photo_folder(root: str) -> str:
    """An ImageFolder made of the photos scikit-learn ships (china.jpg, flower.jpg): 6 classes
    (photo x crop), 2 JPEGs each. Six, not two: the stock handler's top-5 fails below 5 classes."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    for name in ("china", "flower"):
        img = Image.fromarray(load_sample_image(f"{name}.jpg"))
        for crop_name, box in PHOTO_CROPS.items():
            for split in ("train", "val"):
                folder = os.path.join(root, split, f"{name}_{crop_name}")
                os.makedirs(folder, exist_ok=True)
                for i, quality in enumerate((90, 75)):
                    img.crop(box).save(os.path.join(folder, f"{i}.jpg"), quality=quality)
    return root


def resnet18_target(work: str) -> dict:
    """torchvision resnet18 at 224x224 with random weights (speed only), as a self-describing checkpoint."""
    from model_src.net import build_model
    from model_src.preprocessing import Preprocessing

    data = photo_folder(os.path.join(work, "photos"))
    torch.manual_seed(0)
    classes = sorted(os.listdir(os.path.join(data, "val")))
    model_args = {"arch": "resnet18", "in_channels": 3, "num_classes": len(classes)}
    prep = Preprocessing(
        image_size=224, resize_size=256, channels=3, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]
    )
    ckpt = os.path.join(work, "resnet18.pt")
    torch.save(
        {
            "model": build_model(model_args).eval().state_dict(),
            "model_args": model_args,
            "class_names": classes,
            "preprocessing": prep.to_dict(),
            "args": {"data": data},
        },
        ckpt,
    )
    images = sorted(
        os.path.join(data, "val", c, f) for c in classes for f in sorted(os.listdir(os.path.join(data, "val", c)))
    )
    return {"name": "resnet18", "checkpoint": ckpt, "images": images, "data": data}


TARGETS = {"digits": digits_target, "resnet18": resnet18_target}  # digits takes its checkpoint too
