"""Data: the bundled digits default, ImageFolder loading and the training augmentation."""

import functools
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from bundle.settings import DIGITS_DIR
from model_src.preprocessing import Preprocessing

GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
# Exactly what the handler decodes (model_src.image_checks.ACCEPTED_FORMATS): torchvision's list also has
# .ppm and .pgm, which serving refuses, so a model would train on images it can never be sent.
IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")
CACHE_BYTES = 2**30  # prepared images kept in memory per process, at most


class DataError(ValueError):
    """The data is not what training or evaluation needs; the message says what to change."""


def write_digits(root: str = DIGITS_DIR, val_fraction: float = 0.2, seed: int = 0) -> str:
    """Write scikit-learn's 1,797 8x8 digits as an ImageFolder tree of PNGs.

    Split: within each class, the samples are shuffled with numpy seed `seed` and the
    first `val_fraction` go to val/ (stratified, the same on every machine).
    Pixels: sklearn's 0..16 ink becomes 8-bit black ink on white paper.
    """
    if os.path.isfile(os.path.join(root, "split.json")):
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.RandomState(seed)
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = os.path.join(tmp, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in part:
                pixels = (255 - np.rint(digits.images[i] * 255 / 16)).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{i:04d}.png"))
            counts[split] += len(part)
    with open(os.path.join(tmp, "split.json"), "w") as f:
        json.dump(
            {
                "source": "sklearn.datasets.load_digits",
                "val_fraction": val_fraction,
                "seed": seed,
                "counts": counts,
            },
            f,
            indent=2,
        )
    os.replace(tmp, root)  # atomic: a half-written tree never looks complete
    return root


def ensure_data(path: str) -> str:
    """`path`, checked to hold train/ and val/ ImageFolder trees (the digits set is written first when
    `path` is DIGITS_DIR); DataError otherwise."""
    if os.path.abspath(path) == DIGITS_DIR:
        write_digits(path)
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(path, split)):
            raise DataError(f"{path} needs {split}/<class>/<images> folders (ImageFolder layout)")
    return path


def decode_trusted(prep: Preprocessing, path: str):
    """Decode a training image exactly as the handler does, minus the pixel cap (our own data)."""
    return prep.decode(path, max_pixels=None)


def load_prepared(prep: Preprocessing, path: str):
    """Decode, then `prep.prepare`: the model's mode and size, the same PIL image the handler converts."""
    return prep.prepare(decode_trusted(prep, path))


def is_image(path: str) -> bool:
    """True if the file name ends in one of IMG_EXTENSIONS (any case)."""
    return path.lower().endswith(IMG_EXTENSIONS)


def image_folder(root: str, **kwargs) -> datasets.ImageFolder:
    """ImageFolder that also takes the GIFs the handler accepts (torchvision skips them by default)."""
    return datasets.ImageFolder(root, is_valid_file=is_image, **kwargs)


def detect_channels(root: str, sample: int = 32) -> int:
    """1 if the images are grey, else 3."""
    ds = image_folder(root, loader=lambda p: p)
    step = max(1, len(ds) // sample)
    for path, _ in ds.samples[::step]:
        with Image.open(path) as img:
            if img.mode not in GREY_MODES:
                return 3
    return 1


def compute_mean_std(root: str, prep: Preprocessing, limit: int = 2000) -> tuple[list, list]:
    """Per-channel mean/std of prepared training images (a deterministic subset for big sets)."""
    ds = image_folder(root, loader=functools.partial(load_prepared, prep))
    step = max(1, len(ds) // limit)
    arrs = [np.asarray(ds[i][0], dtype=np.float64) / 255.0 for i in range(0, len(ds), step)]
    x = np.stack(arrs)
    if x.ndim == 3:
        x = x[..., None]
    return x.mean(axis=(0, 1, 2)).round(4).tolist(), x.std(axis=(0, 1, 2)).round(4).tolist()


def train_transform(prep: Preprocessing, augment: str):
    """Augmentation on the prepared PIL image (`prepare` has already run) -> the shared to_tensor."""
    fill = prep.background if prep.channels == 1 else (prep.background,) * 3
    if augment == "affine":  # small shifts/rotations: right for digits and other centred glyphs
        aug = transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=fill)
    elif augment == "crop-flip":  # photos
        aug = transforms.Compose(
            [
                transforms.RandomResizedCrop(prep.image_size, scale=(0.5, 1.0)),
                transforms.RandomHorizontalFlip(),
            ]
        )
    elif augment == "none":
        aug = transforms.Lambda(lambda img: img)
    else:
        raise ValueError(f"unknown augmentation {augment!r}")
    return transforms.Compose([aug, prep.to_tensor])


class CachedImages(torch.utils.data.Dataset):
    """ImageFolder of prepared images (`prep.prepare` runs in the loader), optionally kept in memory.

    `transform` runs on the prepared image: the training augmentation + to_tensor, or `prep`
    itself for the validation transform, which then means its to_tensor, so that ds[i] is
    exactly prep(decoded image), what the handler computes.
    """

    def __init__(self, root: str, prep: Preprocessing, transform, cache: bool):
        self.folder = image_folder(root, loader=functools.partial(load_prepared, prep))
        self.transform = transform.to_tensor if isinstance(transform, Preprocessing) else transform
        self.cache = {} if cache else None

    @property
    def classes(self):
        """The class names, sorted: the folder names under the root."""
        return self.folder.classes

    @property
    def targets(self):
        """Each image's class index, in the folder's order."""
        return self.folder.targets

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        if self.cache is None:
            img, target = self.folder[i]
        else:
            if i not in self.cache:
                self.cache[i] = self.folder[i]
            img, target = self.cache[i]
        return self.transform(img), target


def fits_in_cache(data: str, prep: Preprocessing) -> bool:
    """Whether every prepared train and val image fits in CACHE_BYTES (PIL keeps RGB as 4 bytes a pixel)."""
    files = sum(
        len(names) for split in ("train", "val") for _, _, names in os.walk(os.path.join(data, split))
    )
    return files * prep.image_size**2 * (1 if prep.channels == 1 else 4) <= CACHE_BYTES


def build_datasets(data: str, prep: Preprocessing, augment: str, limit: int | None = None):
    """The (train, val) datasets of ImageFolder root `data`, kept in memory if they fit; `limit`
    keeps an evenly spread subset of about that many images each. DataError if their classes differ."""
    cache = fits_in_cache(data, prep)
    train = CachedImages(os.path.join(data, "train"), prep, train_transform(prep, augment), cache=cache)
    val = CachedImages(os.path.join(data, "val"), prep, prep, cache=cache)
    if train.classes != val.classes:
        raise DataError(f"train/ and val/ have different classes: {train.classes} vs {val.classes}")
    if limit:  # cheap mode: an evenly spread subset
        train = Subset(train, list(range(0, len(train), max(1, len(train) // limit))))
        val = Subset(val, list(range(0, len(val), max(1, len(val) // limit))))
    return train, val


def base_and_indices(ds) -> tuple[torch.utils.data.Dataset, list[int]]:
    """Unwrap (nested) Subsets: the underlying dataset and the indices into it."""
    if isinstance(ds, Subset):
        base, indices = base_and_indices(ds.dataset)
        return base, [indices[i] for i in ds.indices]
    return ds, list(range(len(ds)))


def fill_cache(ds, workers: int):
    """Prepare every image `ds` uses into its cache, here in the main process and before any loader
    forks: forked workers then share the cache copy-on-write, whereas what a non-persistent worker
    caches itself is lost at the end of the epoch."""
    base, indices = base_and_indices(ds)
    if not isinstance(base, CachedImages) or base.cache is None:
        return
    missing = [i for i in indices if i not in base.cache]
    if not missing:
        return
    # Its own generator: drawing the loader's base seed from the global RNG would make the
    # model's initial weights depend on --workers.
    loader = DataLoader(
        Subset(base.folder, missing),
        batch_size=64,
        num_workers=workers,
        collate_fn=list,
        generator=torch.Generator(),
    )
    items = (item for batch in loader for item in batch)
    base.cache.update(zip(missing, items))


def build_loaders(train, val, batch_size: int, workers: int, rank: int, world: int):
    """(train loader, val loader, train sampler), each rank on its own shard when `world` > 1; the
    datasets' caches are filled first. DataError if the training split makes no batch."""
    if world > 1:
        train_sampler = torch.utils.data.distributed.DistributedSampler(train, world, rank, shuffle=True)
        # Each rank evaluates a disjoint shard (no padding) so summed counts are exact.
        val = Subset(val, list(range(rank, len(val), world)))
    else:
        train_sampler = torch.utils.data.RandomSampler(train)
    fill_cache(train, workers)
    fill_cache(val, workers)
    train_loader = DataLoader(
        train,
        batch_size=batch_size,
        sampler=train_sampler,
        num_workers=workers,
        # Drop the ragged last batch (a batch of 1 breaks BatchNorm) unless it is the only one; the
        # sampler's length is this process's share, which is what its batches come from.
        drop_last=len(train_sampler) > batch_size,
        # Fresh workers each epoch draw their seeds from the global RNG, which main re-seeds per
        # epoch: augmentation then depends on (seed, epoch) alone, as --resume needs. Persistent
        # workers would keep the RNG state of the epoch they started in.
        persistent_workers=False,
    )
    if len(train_loader) == 0:
        raise DataError(
            f"no training batch: {len(train_sampler)} images per process; add images or use fewer processes"
        )
    val_loader = DataLoader(
        val, batch_size=256, shuffle=False, num_workers=workers, persistent_workers=workers > 0
    )
    return train_loader, val_loader, train_sampler


def golden_set(val_root: str, per_class: int = 10) -> list[tuple[str, str]]:
    """A fixed, stratified sample of validation images: (path, label) pairs."""
    ds = image_folder(val_root, loader=lambda p: p)
    picked = []
    for c, name in enumerate(ds.classes):
        paths = sorted(p for p, t in ds.samples if t == c)
        step = max(1, len(paths) // per_class)
        picked += [(p, name) for p in paths[::step][:per_class]]
    return picked


if __name__ == "__main__":
    root = write_digits()
    with open(os.path.join(root, "split.json")) as f:
        print(f"digits ImageFolder at {root}/: {json.load(f)['counts']}")
