"""Real photos that installed packages ship, as ImageFolder trees: no download, the same on every machine.

- `write_photo_crops`: random crops of scikit-image's and scikit-learn's sample photos, one
  class per photo: real images to check exports of an ImageNet model against its eager self.
- `write_textures`: scikit-image's brick / grass / gravel textures (512 x 512 grey), train
  crops from the top half and val crops from the bottom half, so no val pixel was trained on:
  a small real-photo task for comparing fine-tuning with training from scratch.
"""

import json
import os
import shutil

import numpy as np
from PIL import Image

TEXTURES = ("brick", "grass", "gravel")


def load_photos() -> dict[str, Image.Image]:
    """name -> PIL image (RGB, or L for the grey cameraman)."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    photos = {
        name: getattr(skimage.data, name)() for name in ("chelsea", "coffee", "rocket", "camera", "astronaut")
    }
    photos["china"] = load_sample_image("china.jpg")
    photos["flower"] = load_sample_image("flower.jpg")
    return {name: Image.fromarray(pixels) for name, pixels in photos.items()}


def random_crop(img: Image.Image, rng: np.random.RandomState, min_scale: float = 0.35) -> Image.Image:
    """A square crop of side min_scale..1 times the shorter side, at a random place."""
    w, h = img.size
    side = int(rng.uniform(min_scale, 1.0) * min(w, h))
    left, top = rng.randint(0, w - side + 1), rng.randint(0, h - side + 1)
    return img.crop((left, top, left + side, top + side))


def write_tree(root: str, splits: dict[str, dict[str, list[Image.Image]]], meta: dict) -> str:
    """splits: split -> class -> images. Written to a temp folder, then renamed: never half-written."""
    if os.path.isfile(os.path.join(root, "split.json")):
        return root
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    for split, classes in splits.items():
        for name, images in classes.items():
            folder = os.path.join(tmp, split, name)
            os.makedirs(folder, exist_ok=True)
            for i, img in enumerate(images):
                img.save(os.path.join(folder, f"{i:04d}.png"))
        counts[split] = sum(len(images) for images in classes.values())
    with open(os.path.join(tmp, "split.json"), "w") as f:
        json.dump({**meta, "counts": counts}, f, indent=2)
    os.replace(tmp, root)
    return root


def write_photo_crops(root: str, per_photo: int = 30, train_per_photo: int = 2, seed: int = 0) -> str:
    """Crops of the sample photos: val/<photo>/ gets `per_photo`, train/<photo>/ a few others."""
    rng = np.random.RandomState(seed)
    photos = load_photos()
    splits = {
        split: {name: [random_crop(img, rng) for _ in range(n)] for name, img in photos.items()}
        for split, n in (("val", per_photo), ("train", train_per_photo))
    }
    return write_tree(root, splits, {"source": "skimage.data + sklearn sample images", "seed": seed})


def write_textures(
    root: str, per_class: int = 16, val_per_class: int = 16, crop: int = 128, seed: int = 0
) -> str:
    """brick/grass/gravel crops of `crop` px: train from rows 0..255, val from rows 256..511 (disjoint)."""
    import skimage.data

    rng = np.random.RandomState(seed)
    splits = {"train": {}, "val": {}}
    for name in TEXTURES:
        img = Image.fromarray(getattr(skimage.data, name)())  # (512, 512) grey
        half = img.height // 2
        for split, n, top in (("train", per_class, 0), ("val", val_per_class, half)):
            ys = rng.randint(top, top + half - crop + 1, size=n)
            xs = rng.randint(0, img.width - crop + 1, size=n)
            splits[split][name] = [img.crop((x, y, x + crop, y + crop)) for x, y in zip(xs, ys)]
    meta = {"source": "skimage.data brick/grass/gravel", "crop": crop, "seed": seed, "val_rows": "256..511"}
    return write_tree(root, splits, meta)
