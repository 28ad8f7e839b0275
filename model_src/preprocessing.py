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
import re
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # a 12 MP photo passes; a decompression bomb does not
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
ACCEPTED_NAMES = "PNG, JPEG, GIF, BMP, TIFF or WebP"
MAGIC = {  # leading bytes -> format; RIFF....WEBP is checked apart
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"II+\x00": "TIFF",  # BigTIFF
    b"MM\x00+": "TIFF",
}
# libjpeg walks every block of the image once per scan, even an empty one: a 0.4 MB file of 6,500
# empty scans over 40 MP decodes for half a minute. Real progressive JPEGs have about 10 scans.
MAX_JPEG_SCANS = 100
# Structures that Pillow walks one at a time in Python, 0.3-5 us each, whatever they hold: 12 MB of empty ones
# cost it 3-18 s (3 M JPEG comments, 1 M PNG chunks, 6 M GIF comment sub-blocks, 1 M TIFF strips). Real images
# have far fewer: a JPEG ~10 segments (~260 with an ICC profile split in 64 KB pieces), a PNG one chunk per
# 8-64 KB of data (a 16 MiB request holds 2,000 at 8 KB), a GIF's first frame one sub-block per 255 bytes
# (66,000 in 16 MiB), a TIFF one strip per 8-64 KB (4,500 for a 12 MP photo at 8 KB). The pre-scans that
# count them read a few bytes per structure and stop past the limit.
MAX_JPEG_SEGMENTS = 1_000
MAX_PNG_CHUNKS = 10_000
MAX_GIF_BLOCKS = 100_000  # blocks and sub-blocks up to the end of the first frame, the only one decoded
MAX_TIFF_STRIPS = 10_000  # strips or tiles
MAX_TIFF_TAGS = 1_000  # entries in the first directory; real files have 10-50
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
# What libjpeg takes for a marker: an FF (after any number of FF fill bytes) and a code; FF 00 is a stuffed
# byte. Only the last FF of a run is matched, so a run of FF costs one step per byte: `\xff+` backtracked
# through the whole run at each of its bytes (16 KB of FF took 1.3 s). RSTn and TEM carry no length and no
# cost to Pillow: they are skipped here, in C, so the Python loop runs once per segment, at most the limit.
JPEG_MARKER = re.compile(rb"\xff([^\x00\x01\xd0-\xd7\xff])")

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """A request input that cannot be used; `status` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def sniff_format(data: bytes) -> str:
    """The format from the magic bytes, before any decoder sees the data; 415 for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in MAGIC.items():
        if data.startswith(magic):
            return fmt
    raise InputError(f"not an accepted image format: send {ACCEPTED_NAMES}", 415)


def count_jpeg_markers(data: bytes, max_scans: int = MAX_JPEG_SCANS, max_segments: int = MAX_JPEG_SEGMENTS):
    """(start-of-scan markers, segments) in a JPEG, found the way libjpeg finds them; counting stops past
    either limit. Linear in the data: one regex step per byte, one loop turn per segment.

    Segments are skipped by their length, as libjpeg does, so an SOS inside an EXIF thumbnail does not
    count; between scans, the next marker is the next FF not followed by 00 or FF."""
    scans, segments, pos = 0, 0, 2
    while scans <= max_scans and segments <= max_segments and (m := JPEG_MARKER.search(data, pos)):
        code, pos = m[1][0], m.end()
        if code == 0xD9:  # EOI: libjpeg stops reading here
            break
        scans += code == 0xDA
        segments += 1
        pos += int.from_bytes(data[pos : pos + 2], "big")
    return scans, segments


def count_png_chunks(data: bytes, limit: int = MAX_PNG_CHUNKS) -> int:
    """Chunks up to IEND, each skipped by its length (12 bytes read per chunk); counting stops past
    `limit`."""
    chunks, pos = 0, 8
    while chunks <= limit and pos + 8 <= len(data):
        chunks += 1
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return chunks


def count_gif_blocks(data: bytes, limit: int = MAX_GIF_BLOCKS) -> int:
    """Blocks and sub-blocks up to the end of the first image's data, where Pillow stops reading (it decodes
    the first frame only); counting stops past `limit`. One loop turn per block or sub-block."""
    blocks, pos = 0, 13  # after the header and the logical screen descriptor
    if len(data) > 10 and data[10] & 0x80:  # a global colour table
        pos += 3 << ((data[10] & 7) + 1)
    image = False
    while blocks <= limit and pos < len(data) and not image:
        intro = data[pos]
        if intro == 0x21:  # an extension: introducer, label, sub-blocks
            pos += 2
        elif intro == 0x2C:  # an image: descriptor, local colour table, LZW code size, sub-blocks
            flags = data[pos + 9] if pos + 9 < len(data) else 0
            pos += 11 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            image = True
        else:  # the trailer or garbage: Pillow stops there too
            break
        blocks += 1
        while blocks <= limit and pos < len(data) and (size := data[pos]):
            blocks += 1
            pos += 1 + size
        pos += 1  # the zero-length terminator
    return blocks


def count_tiff_strips(data: bytes) -> tuple[int, int]:
    """(entries in the first directory, the most strips or tiles it declares), read from the directory
    itself as Pillow would before it unpacks any value: 0 entries counted past MAX_TIFF_TAGS. Classic TIFF
    and BigTIFF; a directory that does not fit the data counts as empty and is Pillow's to refuse."""
    big = data[2:4] in (b"+\x00", b"\x00+")
    order = "little" if data[:2] == b"II" else "big"
    at = int.from_bytes(data[8:16] if big else data[4:8], order)
    width, entry, size = (8, 20, 8) if big else (2, 12, 4)  # of the entry count, an entry, a count field
    entries = int.from_bytes(data[at : at + width], order)
    if entries > MAX_TIFF_TAGS:
        return entries, 0
    strips = 0
    for pos in range(at + width, min(at + width + entries * entry, len(data) - entry + 1), entry):
        # strip/tile offsets, byte counts
        if int.from_bytes(data[pos : pos + 2], order) in (273, 279, 324, 325):
            strips = max(strips, int.from_bytes(data[pos + 4 : pos + 4 + size], order))
    return entries, strips


def pixel_cost(img: Image.Image) -> int:
    """Pixels weighted by what decoding and converting this mode costs (MODE_COST)."""
    cost = MODE_COST.get(img.mode, 3 if "transparency" in img.info else 1)  # P or L with tRNS: composited
    return img.width * img.height * cost


def check_cheaply(data: bytes, fmt: str):
    """Refuse inputs whose decoding cost is not bounded by their pixel count, before Pillow sees them: each
    pre-scan reads a few bytes per structure and stops past its limit."""
    if fmt == "JPEG":
        scans, segments = count_jpeg_markers(data)
        if scans > MAX_JPEG_SCANS:
            raise InputError(f"JPEG has over {MAX_JPEG_SCANS} scans; a normal one has about 10", 413)
        if segments > MAX_JPEG_SEGMENTS:
            raise InputError(f"JPEG has over {MAX_JPEG_SEGMENTS:,} segments; a normal one has about 10", 413)
    elif fmt == "PNG" and count_png_chunks(data) > MAX_PNG_CHUNKS:
        raise InputError(f"PNG has over {MAX_PNG_CHUNKS:,} chunks", 413)
    elif fmt == "GIF" and count_gif_blocks(data) > MAX_GIF_BLOCKS:
        raise InputError(
            f"GIF has over {MAX_GIF_BLOCKS:,} blocks and sub-blocks before its first frame ends", 413
        )
    elif fmt == "TIFF":
        entries, strips = count_tiff_strips(data)
        if entries > MAX_TIFF_TAGS:
            raise InputError(f"TIFF directory has over {MAX_TIFF_TAGS:,} entries", 413)
        if strips > MAX_TIFF_STRIPS:
            raise InputError(
                f"TIFF has {strips:,} strips or tiles, over the limit of {MAX_TIFF_STRIPS:,}", 413
            )


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
    image_size: int = 16  # side of the square model input
    resize_size: int | None = None  # None: resize straight to image_size; else shorter side, then centre crop
    channels: int = 1  # 1 = grey ("L"), 3 = RGB
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    background: int = 255  # what transparent pixels are composited onto (white paper)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
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
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))
