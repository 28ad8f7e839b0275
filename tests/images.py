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
    # minus zlib header
    piece = (z.compress(bytes((side + 1) * rows_per_piece)) + z.flush(zlib.Z_FULL_FLUSH))[2:]
    n = (side + 1) * side  # raw bytes: a filter byte plus `side` pixels per row, all zero
    adler = ((n % 65521) << 16) | 1  # Adler-32 of n zero bytes
    last = b"\x03\x00"  # an empty final block
    idat = b"\x78\xda" + piece * (side // rows_per_piece) + last + struct.pack(">I", adler)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def photo_jpeg(width: int = 4000, height: int = 3000, seed: int = 0) -> bytes:
    """A big colour photo stand-in: smooth gradients plus noise (encodes in a few seconds, ~4.5 MB at 12
    MP)."""
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


# --- hostile bodies past the decode budget (issue 25, finding 8): cheap to send, costly in Pillow's loops ---


def thin_png(length: int = 8000) -> bytes:
    """A 1 x length grey PNG (~95 bytes): resizing its shorter side to 256 makes 256 x (256 * length)
    pixels."""
    return encode(Image.new("L", (1, length), 255), "PNG")


def png_with_chunks(n: int = 1_000_000) -> bytes:
    """A valid tiny PNG with n empty private ancillary chunks before its image data (12 bytes each)."""
    png = encode(Image.new("L", (8, 8), 255), "PNG")
    empty = struct.pack(">I", 0) + b"prIv" + struct.pack(">I", zlib.crc32(b"prIv"))
    return png[:33] + empty * n + png[33:]  # after the signature (8) and IHDR (25)


def jpeg_with_comments(n: int = 3_000_000) -> bytes:
    """A valid tiny JPEG with n empty COM segments after SOI (4 bytes each)."""
    jpeg = encode(Image.new("L", (8, 8), 255), "JPEG")
    return jpeg[:2] + b"\xff\xfe\x00\x02" * n + jpeg[2:]


def jpeg_with_ff_run(n: int = 100_000) -> bytes:
    """A valid tiny JPEG whose scan data ends in n bytes of 0xFF and a 00: libjpeg reads the run as fill
    bytes before a stuffed zero (one data byte past the last block, ignored), so the image decodes."""
    jpeg = encode(Image.new("L", (8, 8), 255), "JPEG")
    return jpeg[:-2] + b"\xff" * n + b"\x00" + jpeg[-2:]


def gif_with_comment_blocks(n: int = 6_000_000) -> bytes:
    """A valid tiny GIF whose comment extension holds n one-byte sub-blocks (2 bytes each)."""
    gif = encode(Image.new("L", (8, 8), 255), "GIF")
    at = 13 + 3 * 2 ** ((gif[10] & 7) + 1) if gif[10] & 0x80 else 13  # after the global colour table
    return gif[:at] + b"\x21\xfe" + b"\x01c" * n + b"\x00" + gif[at:]


def tiff_with_strips(n: int = 1_000_000) -> bytes:
    """An uncompressed 1 x n grey TIFF with one row per strip: n strips, all pointing at the same pixel
    byte."""
    entries = [  # (tag, type, count, value or offset); types: 3 SHORT, 4 LONG
        (256, 4, 1, 1),  # width
        (257, 4, 1, n),  # height
        (258, 3, 1, 8),  # bits per sample
        (259, 3, 1, 1),  # no compression
        (262, 3, 1, 1),  # black is zero
        (273, 4, n, None),  # strip offsets
        (277, 3, 1, 1),  # samples per pixel
        (278, 4, 1, 1),  # rows per strip
        (279, 3, n, None),  # strip byte counts
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    pixel = 8 + ifd_size
    offsets_at = pixel + 2  # word-aligned
    counts_at = offsets_at + 4 * n
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if tag == 273:
            value = offsets_at
        elif tag == 279:
            value = counts_at if n > 2 else 0  # a short array fits in the entry itself (n = 1, 2 here)
        packed = (
            struct.pack("<H", value) + b"\x00\x00" if typ == 3 and count == 1 else struct.pack("<I", value)
        )
        out += struct.pack("<HHI", tag, typ, count) + packed
    out += struct.pack("<I", 0) + b"\xff\x00"
    assert len(out) == offsets_at
    return out + struct.pack(f"<{n}I", *[pixel] * n) + struct.pack(f"<{n}H", *[1] * n)


def png_with_text_bomb(size: int = 2_000_000) -> bytes:
    """A valid tiny PNG with a compressed text chunk that inflates past Pillow's own text limit (1 MB):
    Pillow refuses it with a message naming its internals."""
    png = encode(Image.new("L", (8, 8), 255), "PNG")
    data = b"note\x00\x00" + zlib.compress(bytes(size), 9)
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))
    return png[:33] + chunk + png[33:]


def past_the_decode_budget() -> dict[str, bytes]:
    """Issue 25, finding 8: name -> a body each pre-scan must refuse (413) before Pillow opens it, at sizes
    that are quick to build; the finding's own sizes are the defaults of the generators."""
    return {
        "png-20k-chunks": png_with_chunks(20_000),
        "jpeg-2k-comments": jpeg_with_comments(2_000),
        "gif-200k-comment-sub-blocks": gif_with_comment_blocks(200_000),
        "tiff-20k-strips": tiff_with_strips(20_000),
    }
