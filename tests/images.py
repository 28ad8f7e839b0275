"""Test images made in memory: every format and mode the handler must accept, and bodies it must refuse."""

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def digit_like(size=32, mode="L") -> Image.Image:
    """A dark stroke on white, in any mode."""
    arr = np.full((size, size), 255, np.uint8)
    arr[size // 4 : 3 * size // 4, size // 2 - 2 : size // 2 + 2] = 0
    return Image.fromarray(arr, "L").convert(mode) if mode != "L" else Image.fromarray(arr, "L")


def accepted() -> dict[str, bytes]:
    """name -> encoded image, one per format and colour mode a browser can open."""
    grey = digit_like()
    rgba = grey.convert("RGBA")
    arr16 = np.asarray(grey).astype(np.uint16) * 257  # 16-bit grey
    frames = [grey, grey.transpose(Image.FLIP_LEFT_RIGHT)]
    return {
        "png-L": encode(grey, "PNG"),
        "png-RGB": encode(grey.convert("RGB"), "PNG"),
        "png-RGBA": encode(rgba, "PNG"),
        "png-LA": encode(grey.convert("LA"), "PNG"),
        "png-P": encode(grey.convert("P"), "PNG"),
        "png-1": encode(grey.convert("1"), "PNG"),
        "png-I16": encode(Image.fromarray(arr16), "PNG"),  # uint16 arrays become mode I;16
        "jpeg-RGB": encode(grey.convert("RGB"), "JPEG", quality=95),
        "jpeg-L": encode(grey, "JPEG"),
        "jpeg-CMYK": encode(grey.convert("CMYK"), "JPEG"),
        "gif-animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "bmp": encode(grey.convert("RGB"), "BMP"),
        "webp": encode(grey.convert("RGB"), "WEBP", lossless=True),
        "tiff": encode(grey, "TIFF"),
    }


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height pixels (a decompression bomb's header)."""
    png = encode(Image.new("L", (8, 8), 255), "PNG")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return png[:8] + chunk + png[33:]


def refused() -> dict[str, tuple[bytes, int]]:
    """name -> (raw body, expected status)."""
    png = encode(digit_like(), "PNG")
    jpeg = encode(digit_like().convert("RGB"), "JPEG")
    return {
        "not-an-image": (b"hello, I am text", 415),
        "truncated-png": (png[: len(png) // 2], 400),
        "corrupt-jpeg": (jpeg[:200] + b"\x00" * 300, 400),
        "bomb-header": (png_declaring(50000, 50000), 413),
        "bad-base64-json": (b'{"data": "%%% not base64 %%%"}', 400),
        "json-without-data": (b'{"url": "http://example.com/x.png"}', 400),
    }


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
