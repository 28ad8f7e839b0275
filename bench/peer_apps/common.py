"""What the three peer apps (LitServe, BentoML, Ray Serve) share: the model's preprocessing, ONNX Runtime on
the CPU, top-5 answers and the 400 for a body that is not an image.

These run inside .venv-peers, which has no torch, so model_src/preprocessing.py (it imports torch) cannot be
imported: below is a minimal numpy port of its decode -> prepare -> to_tensor for 8-bit photos (JPEG, PNG,
WebP in L/RGB/CMYK), the bodies the benchmark posts. tests/test_peer_frameworks.py checks that it gives our
preprocessing's output bit for bit. This file imports nothing from the bundle: the apps run it by path.
"""

import argparse
import io
import json
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

ORIENTATION = 0x0112  # the EXIF tag
TOPK = 5


class NotAnImage(ValueError):
    """The request body is not an image Pillow can decode: the apps answer 400."""


@dataclass(frozen=True)
class Prep:
    """The model's preprocessing settings (model_src.preprocessing.Preprocessing.to_dict())."""

    image_size: int
    resize_size: int | None
    channels: int
    mean: list[float]
    std: list[float]
    background: int = 255

    def table(self) -> np.ndarray:
        """(C, 256) float32: (v / 255 - mean[c]) / std[c] in float32, as normalising_table computes it."""
        levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1)
        return (levels - mean) / std

    def decode(self, data: bytes) -> Image.Image:
        """Body -> a loaded PIL image of the model's mode and size; NotAnImage if it is none. A JPEG is
        decoded at the smallest DCT scale that still covers the resize, as decode_image does."""
        try:
            img = Image.open(io.BytesIO(data))
            if img.format == "JPEG":
                side = self.resize_size or self.image_size
                img.draft(img.mode, (side, side))
            img.load()
        except Exception as e:  # Pillow raises many types for bytes that are not an image
            raise NotAnImage(f"the body is not an image Pillow can decode ({e.__class__.__name__})") from None
        return self.prepare(img)

    def prepare(self, img: Image.Image) -> Image.Image:
        """A decoded image -> the model's mode (EXIF orientation applied) and size (resize_crop)."""
        if img.getexif().get(ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        mode = "L" if self.channels == 1 else "RGB"
        if img.mode != mode:
            img = img.convert(mode)
        if self.resize_size is None:
            return img.resize((self.image_size, self.image_size), Image.BILINEAR)
        return resize_crop(img, self.resize_size, self.image_size)

    def batch(self, images: list[Image.Image]) -> np.ndarray:
        """Prepared images -> the model's float32 input (B, C, H, W), one table look-up per value."""
        table = self.table()
        x = np.empty((len(images), self.channels, self.image_size, self.image_size), dtype=np.float32)
        for i, img in enumerate(images):
            arr = np.asarray(img, dtype=np.uint8)
            arr = arr[:, :, None] if arr.ndim == 2 else arr
            for c in range(arr.shape[2]):
                np.take(table[c], arr[:, :, c], out=x[i, c], mode="clip")
        return x


def resize_crop(img: Image.Image, resize_size: int, size: int) -> Image.Image:
    """The centre `size` square once the shorter side is `resize_size`, in one resampling pass (a port of
    model_src.preprocessing.resize_crop, for images at least `size` on their shorter side once resized)."""
    scale = resize_size / min(img.size)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    left, top = (w - size) // 2, (h - size) // 2
    sx, sy = img.width / w, img.height / h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), Image.BILINEAR, box=box)


class Classifier:
    """model.onnx on ONNX Runtime's CPU provider with `threads` intra-op threads, and its class names."""

    def __init__(self, onnx_path: str, meta_path: str, threads: int):
        with open(meta_path) as f:
            meta = json.load(f)
        self.prep = Prep(**meta["preprocessing"])
        self.names = meta["class_names"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def decode_or_refuse(self, body: bytes) -> Image.Image | str:
        """A request body -> its prepared image, or the message of the 400 when it is not an image."""
        try:
            return self.prep.decode(body)
        except NotAnImage as e:
            return str(e)

    def answer_all(self, items: list) -> list:
        """decode_or_refuse's results for a batch -> top-5 for each image (one model call), the refusals'
        messages kept in their places."""
        images = [i for i in items if not isinstance(i, str)]
        answers = iter(self.answer(images) if images else [])
        return [i if isinstance(i, str) else next(answers) for i in items]

    def answer(self, images: list[Image.Image]) -> list[dict[str, float]]:
        """Prepared images -> one top-5 {class name: probability} per image, from one model call."""
        (logits,) = self.session.run(None, {self.input: self.prep.batch(images)})
        logits = logits.astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        top = np.argsort(-probs, axis=1)[:, :TOPK]
        return [{self.names[j]: round(float(p[j]), 6) for j in row} for p, row in zip(probs, top)]


def error(message: str) -> dict:
    """The JSON body of a 400, shaped like TorchServe's ({"code", "type", "message"})."""
    return {"code": 400, "type": "InputError", "message": message}


def args(argv=None) -> argparse.Namespace:
    """The options every peer app takes (bench/peer_frameworks.py passes them)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", required=True, help="the ONNX file to serve")
    p.add_argument("--meta", required=True, help="JSON with the model's preprocessing and class_names")
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--threads", type=int, required=True, help="ONNX Runtime intra-op threads per worker")
    p.add_argument("--batch", type=int, required=True, help="max batch size")
    p.add_argument("--delay-ms", type=float, required=True, help="max wait for a batch to fill")
    p.add_argument("--port", type=int, required=True)
    return p.parse_args(argv)
