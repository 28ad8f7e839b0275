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
    frames = [grey, grey.transpose(Image.ROTATE_90)]  # a different second frame: GIF merges duplicates
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


# --- more bodies for the handler and serving tests ---------------------------------------------


def random_bytes(n: int = 512, seed: int = 0) -> bytes:
    """Noise that no image plugin recognises (fixed seed; the first byte is not '{' or '[', so not JSON)."""
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert data[:1] not in (b"{", b"[")
    return data


def jpeg_with_garbage(seed: int = 0) -> bytes:
    """A JPEG whose headers (up to and including SOS) are valid and whose entropy-coded data is noise.

    libjpeg shrugs off some noise (it stops at the first marker it finds); with seed 0 the stream
    breaks, which Pillow reports as 'broken data stream'."""
    jpeg = encode(digit_like(64).convert("RGB"), "JPEG", quality=90)
    sos = jpeg.index(b"\xff\xda")
    (length,) = struct.unpack(">H", jpeg[sos + 2 : sos + 4])
    return jpeg[: sos + 2 + length] + random_bytes(400, seed)


def black_png(side: int, rows_per_piece: int = 100) -> bytes:
    """A real side x side all-black 8-bit grey PNG (a decompression bomb: 20000 -> 400 MP in ~390 KB),
    built in milliseconds instead of the seconds PIL needs to compress 400 MB.

    Every piece of `rows_per_piece` rows is deflated once and ends with a full flush, which makes it
    independent of what came before, so the same compressed bytes can simply be repeated."""
    assert side % rows_per_piece == 0
    z = zlib.compressobj(9)
    piece = (z.compress(bytes((side + 1) * rows_per_piece)) + z.flush(zlib.Z_FULL_FLUSH))[2:]  # minus zlib header
    n = (side + 1) * side  # raw bytes: a filter byte plus `side` pixels per row, all zero
    adler = ((n % 65521) << 16) | 1  # Adler-32 of n zero bytes
    last = b"\x03\x00"  # an empty final block
    idat = b"\x78\xda" + piece * (side // rows_per_piece) + last + struct.pack(">I", adler)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def photo_jpeg(width: int = 4000, height: int = 3000, seed: int = 0) -> bytes:
    """A big colour photo stand-in: smooth gradients plus noise (encodes in a few seconds, ~4.5 MB at 12 MP)."""
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 40, (height, width, 1))
    rgb = np.stack([xx / 16 % 256, yy / 12 % 256, (xx + yy) / 28 % 256], -1) + noise
    return encode(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), "JPEG", quality=90)


# --- hostile bodies: small files that cost a decoder far more than their size -----------------------


def scan_bomb_jpeg(side: int = 6320, scans: int = 6500) -> bytes:
    """A progressive grey JPEG declaring side x side pixels, followed by `scans` empty scans.

    libjpeg walks every block of the image once per scan, data or not (a missing segment is only a
    warning), so the decode cost is side^2 x scans while the file stays at ~10 bytes per scan. The
    pixels come from an 8x8 image whose frame header is patched: libjpeg pads the missing data."""
    jpeg = encode(Image.new("L", (8, 8), 255), "JPEG", progressive=True)
    sof = jpeg.index(b"\xff\xc2")
    jpeg = jpeg[: sof + 5] + struct.pack(">HH", side, side) + jpeg[sof + 9 :]
    sos = jpeg.rindex(b"\xff\xda")  # repeat the last scan's header (a refinement scan) with no data
    (length,) = struct.unpack(">H", jpeg[sos + 2 : sos + 4])
    header = jpeg[sos : sos + 2 + length]
    return jpeg[:-2] + header * scans + b"\xff\xd9"


def ico_wrapping_png(side: int = 13300) -> bytes:
    """An ICO whose one entry is a side x side black PNG (ICO entries may be PNGs of any size; the
    directory says 256 x 256). 13,300^2 stays just under PIL's default hard limit (2 x 89.5 MP)."""
    png = black_png(side)
    directory = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)  # 0 means 256
    return struct.pack("<HHH", 0, 1, 1) + directory + png


def blank_rgba_webp(side: int = 6320) -> bytes:
    """A lossless transparent side x side WebP: ~1.6 KB that decode to side^2 x 4 bytes, plus compositing."""
    return encode(Image.new("RGBA", (side, side), (0, 0, 0, 0)), "WEBP", lossless=True, quality=0, method=0)


def float_tiff(side: int = 6320) -> bytes:
    """A deflated side x side 32-bit float TIFF of zeros: ~0.3 MB for 160 MB of samples."""
    return encode(Image.new("F", (side, side), 0.0), "TIFF", compression="tiff_adobe_deflate")


def other_formats() -> dict[str, bytes]:
    """name -> a small valid image in a format PIL opens but the handler does not accept."""
    grey = digit_like()
    rgb = grey.convert("RGB")
    return {
        "ico": encode(rgb, "ICO"),
        "pcx": encode(rgb, "PCX"),
        "tga": encode(rgb, "TGA"),
        "dds": encode(grey.convert("RGBA"), "DDS"),
        "ppm": encode(rgb, "PPM"),
        "sgi": encode(rgb, "SGI"),
        "xbm": encode(grey.convert("1"), "XBM"),
        "qoi": encode(rgb, "QOI"),
        "jpeg2000": encode(rgb, "JPEG2000"),
        "eps-header": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n",
    }
