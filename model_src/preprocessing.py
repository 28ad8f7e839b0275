"""The one definition of how an image becomes a model input.

Training (validation transform), export checks, evaluation and the TorchServe
handler all call `Preprocessing.__call__`; the training augmentation is applied
between `prepare` and `to_tensor`. The settings travel inside every checkpoint and
archive (`Preprocessing.to_dict`), so serving can never drift from evaluation.
"""

import contextlib
import functools
import io
import logging
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from model_src.image_checks import ACCEPTED_NAMES, InputError, check_cheaply, sniff_format

DEFAULT_MAX_PIXELS = 40_000_000  # a 12 MP photo passes; a decompression bomb does not
# TIFF codecs whose cost is bounded by the pixel count. JPEG-in-TIFF is left out: each strip is a JPEG
# that could carry a scan bomb, which counting scans per file cannot bound.
TIFF_COMPRESSIONS = {
    1: "none",
    2: "CCITT RLE",
    3: "CCITT G3",
    4: "CCITT G4",
    5: "LZW",
    8: "Deflate",
    32773: "PackBits",
    32946: "Deflate",
}
# What one pixel costs to decode and convert, relative to 8-bit grey or RGB: to_mode's alpha compositing
# holds three 4-byte copies, high_depth_to_8bit an 8-byte one (measured at 40 MP: RGB 0.17 s and +38 MB,
# RGBA 0.42 s and +343 MB, float 0.69 s and +457 MB). The pixel budget counts weighted pixels, so a 12 MP
# transparent PNG passes and a 40 MP float TIFF or transparent WebP is refused like a 120-160 MP photo.
MODE_COST = {
    **dict.fromkeys(("RGBA", "LA", "PA", "RGBa", "La"), 3),
    **dict.fromkeys(("I", "F"), 4),
    **dict.fromkeys(("I;16", "I;16B", "I;16L", "I;16N", "CMYK"), 2),
}
ORIENTATION = 0x0112  # the EXIF tag

logger = logging.getLogger(__name__)


def pixel_cost(img: Image.Image) -> int:
    """Pixels weighted by what decoding and converting this mode costs (MODE_COST)."""
    cost = MODE_COST.get(img.mode, 3 if "transparency" in img.info else 1)  # P or L with tRNS: composited
    return img.width * img.height * cost


@contextlib.contextmanager
def pillow_ceiling(max_pixels: int | None):
    """Pillow's own decompression-bomb stop, set to our limit and made an error, for any image Pillow
    opens while decoding (a container's inner image would be decoded before we see its size)."""
    old = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        if max_pixels is None:  # trusted data: keep Pillow's default hard stop only
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        else:
            Image.MAX_IMAGE_PIXELS = max_pixels
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def decode_image(
    data,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    resize_size: int | None = None,
) -> Image.Image:
    """Bytes or a path -> a fully loaded PIL image, or InputError.

    Every step before decoding is cheap and bounds what decoding may cost: the format comes from the
    magic bytes (only the six accepted ones reach Pillow, and Pillow may only try that one), the
    structures Pillow walks one by one are counted (check_cheaply), and the pixel count (weighted by the
    mode's cost, and after resizing the shorter side to `resize_size`) is checked from the header, so a
    small file that inflates to gigabytes is refused without allocating them. JPEGs are decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) whose shorter side still has `draft_size` pixels, which is much faster
    for big photos. Animations decode their first frame only.
    Error messages name our limits only; what the decoder said goes to the log.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        with open(data, "rb") as f:
            data = f.read()
    data = bytes(data)
    fmt = sniff_format(data)
    check_cheaply(data, fmt)
    img = open_image(data, fmt, max_pixels)
    check_size(img, max_pixels, resize_size)
    if draft_size and img.format == "JPEG":
        img.draft(img.mode, (draft_size, draft_size))
    with pillow_ceiling(max_pixels):
        try:
            img.load()
        # an inner image (a container's)
        except (
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ):
            raise InputError(too_many_pixels(max_pixels), 413) from None
        except MemoryError:  # the process's ceiling, not the data: the caller answers for it
            raise
        except Exception as e:  # truncated/corrupt data: OSError, SyntaxError, ValueError, EOFError, ...
            logger.info("%s data refused: %s: %s", fmt, e.__class__.__name__, e)
            raise InputError(f"{fmt} image data is corrupt or truncated") from None
    return img


def too_many_pixels(max_pixels: int | None) -> str:
    """The refusal message for an image over the pixel limit, naming the limit when there is one."""
    return "image has too many pixels" + (f": the limit is {max_pixels:,}" if max_pixels else "")


def open_image(data: bytes, fmt: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header with the one plugin the magic bytes named; no pixel is decoded yet."""
    try:
        with pillow_ceiling(None):  # check_size applies our limit, with a clearer message
            img = Image.open(io.BytesIO(data), formats=[fmt])
    except UnidentifiedImageError:
        raise InputError(f"not a valid {fmt} image (send {ACCEPTED_NAMES})", 415) from None
    except Image.DecompressionBombError:  # PIL's hard stop, far above any sane image
        raise InputError(too_many_pixels(max_pixels), 413) from None
    except Exception as e:  # PIL raises many types for broken headers
        logger.info("%s header refused: %s: %s", fmt, e.__class__.__name__, e)
        raise InputError(f"could not read the {fmt} image header: it is corrupt or truncated") from None
    if fmt == "TIFF" and (code := img.tag_v2.get(259, 1)) not in TIFF_COMPRESSIONS:
        name = TiffImagePlugin.COMPRESSION_INFO.get(code, code)
        raise InputError(
            f"TIFF compression {name} is not accepted; use one of {sorted(set(TIFF_COMPRESSIONS.values()))}",
            415,
        )
    return img


def check_size(img: Image.Image, max_pixels: int | None, resize_size: int | None = None):
    """Refuse, from the header's size alone, an empty image or one over `max_pixels` as it is, weighted by
    its mode's cost, or once its shorter side is resized to `resize_size` (413); None skips the limits."""
    width, height = img.size
    if width < 1 or height < 1:
        raise InputError(f"image has an empty size {width}x{height}")
    if max_pixels is None:
        return
    if width * height > max_pixels:
        raise InputError(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}", 413
        )
    if (cost := pixel_cost(img)) > max_pixels:
        raise InputError(
            f"image is {width}x{height} {img.mode}: it costs as much to decode as {cost:,} pixels of RGB, "
            f"over the limit of {max_pixels:,}",
            413,
        )
    # A thin image is small until its shorter side is resized: 1x8000 at 256 is 256x2,048,000 (3.9 GB, 7 s).
    if resize_size and (size := shorter_side_to(img.size, resize_size))[0] * size[1] > max_pixels:
        raise InputError(
            f"image is {width}x{height}: resizing its shorter side to {resize_size} makes it "
            f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, over the limit of {max_pixels:,}",
            413,
        )


@dataclass
class Preprocessing:
    """The eval preprocessing a model was trained with: decode, convert, resize (and crop), normalise."""

    image_size: int = 16  # side of the square model input
    resize_size: int | None = None  # None: resize straight to image_size; else shorter side, then centre crop
    channels: int = 1  # 1 = grey ("L"), 3 = RGB
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    background: int = 255  # what transparent pixels are composited onto (white paper)

    def to_dict(self) -> dict:
        """The settings as a plain dict, as the manifest (in checkpoints and archives) stores them."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """The preprocessing that `to_dict` wrote."""
        return cls(**d)

    def decode(self, data, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Bytes or a path -> PIL image. Training and serving both decode through here. A JPEG is decoded at
        the smallest scale that still covers the resize (decode_image): resizing then only ever shrinks it."""
        return decode_image(data, max_pixels, self.resize_size or self.image_size, self.resize_size)

    def pixel_cost(self, img: Image.Image) -> int:
        """What decoding and preparing `img` costs, in pixels of RGB: its weighted pixels, or the pixels
        after resizing its shorter side, whichever is more."""
        resized = shorter_side_to(img.size, self.resize_size) if self.resize_size else (0, 0)
        return max(pixel_cost(img), resized[0] * resized[1])

    def prepare(self, img: Image.Image) -> Image.Image:
        """Any decoded PIL image -> a PIL image of the model's mode and size."""
        img = to_mode(img, "L" if self.channels == 1 else "RGB", self.background)
        if self.resize_size is None:
            return img.resize((self.image_size, self.image_size), Image.BILINEAR)
        return resize_crop(img, self.resize_size, self.image_size)

    def to_tensor(self, img: Image.Image, out: torch.Tensor | None = None) -> torch.Tensor:
        """Prepared PIL image -> normalised float tensor (C, H, W), written into `out` when given (a batch's
        row, see `batch`). One table look-up per value: the table holds (v / 255 - mean) / std for the 256
        grey levels, computed in float32 as a per-pixel formula would, so the values are the same bit for
        bit."""
        arr = np.asarray(img, dtype=np.uint8)  # (H, W) or (H, W, C); no copy for L and RGB
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if out is None:
            out = torch.empty((arr.shape[2], arr.shape[0], arr.shape[1]), dtype=torch.float32)
        table, dst = normalising_table(tuple(self.mean), tuple(self.std)), out.numpy()
        for c in range(arr.shape[2]):
            np.take(table[c], arr[:, :, c], out=dst[c], mode="clip")  # "clip": unbuffered; uint8 is in range
        return out

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """Prepared PIL images -> the model's input batch (B, C, H, W), each written straight into its row."""
        x = torch.empty((len(images), self.channels, self.image_size, self.image_size), dtype=torch.float32)
        for i, img in enumerate(images):
            self.to_tensor(img, x[i])
        return x

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """A decoded image -> the model's input (C, H, W): the evaluation transform of training."""
        return self.to_tensor(self.prepare(img))


@functools.lru_cache(maxsize=16)
def normalising_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: (v / 255 - mean[c]) / std[c] for every uint8 v, in float32 arithmetic."""
    levels = torch.from_numpy(np.arange(256, dtype=np.float32) / 255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1)
    table = ((levels - mean_t) / std_t).numpy()
    table.flags.writeable = False  # shared by every call with these numbers
    return table


def to_mode(img: Image.Image, mode: str, background: int = 255) -> Image.Image:
    """Convert any PIL mode (1, L, P, RGBA, LA, CMYK, I;16, I, F, ...) to "L" or "RGB",
    after applying the EXIF orientation."""
    try:
        if img.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose copies the image even when it is upright
            img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block (PIL raises SyntaxError, ValueError, ...): keep the
        pass  # stored orientation, as browsers do, rather than refuse pixels that decoded fine
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = high_depth_to_8bit(img)
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:  # palette index or tRNS colour key
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite on the background instead of dropping alpha, which would turn
        # fully transparent (often black) pixels into ink.
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background,) * 3 + (255,))
        img = Image.alpha_composite(canvas, rgba)
    if img.mode == mode:
        return img
    return img.convert(mode)  # CMYK, YCbCr, 1, P, ... -> RGB or L


def high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float images: scale to 0..255 (PIL's own convert("L") clips instead)."""
    if img.mode.startswith("I;16"):  # in integers: (x + 128) // 257 == rint(x / 257) for every uint16,
        # 6x faster and a quarter of the memory of float64 on a 40 MP image
        arr = np.asarray(img).astype(np.uint32)
        arr += 128
        arr //= 257  # in place: one working copy, not three
        return Image.fromarray(arr.astype(np.uint8), mode="L")
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "I" and arr.max(initial=0) > 255:
        arr /= 257.0
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:  # assume 0..1 floats when they look like it
        arr *= 255.0
    np.clip(np.rint(arr, out=arr), 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def resize_crop(img: Image.Image, resize_size: int, size: int) -> Image.Image:
    """The centre `size` square of `img` once its shorter side is resized to `resize_size`, in one resampling
    pass that computes only the square's pixels: Pillow resamples the matching box of the source, its filter
    reaching past the box's edges as the whole image's resize would. Pillow's float arithmetic places a few
    taps one rounding apart from the two-step resize-then-crop, so values may differ by one grey level."""
    w, h = shorter_side_to(img.size, resize_size)
    if size > min(w, h):  # the crop is bigger than the image: centre_crop pads it
        return center_crop(img.resize((w, h), Image.BILINEAR), size)
    left, top = (w - size) // 2, (h - size) // 2
    sx, sy = img.width / w, img.height / h
    return img.resize(
        (size, size), Image.BILINEAR, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    )


def shorter_side_to(wh: tuple[int, int], size: int) -> tuple[int, int]:
    """The size an image of size `wh` has once its shorter side is resized to `size`."""
    w, h = wh
    scale = size / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The centre `size` square of `img`; where `img` is smaller, Pillow fills the rest with zeros."""
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))
