"""The cheap checks an image request meets before any decoder sees it: the format from the magic bytes, and
counts of the structures Pillow walks one by one (JPEG scans and segments, PNG chunks, GIF blocks, TIFF
strips), each read a few bytes per structure and stopped past its limit.

model_src/preprocessing.py runs them first in `decode_image`; InputError is the error of every input check.
"""

import re
from typing import Literal

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
# What libjpeg takes for a marker: an FF (after any number of FF fill bytes) and a code; FF 00 is a stuffed
# byte. Only the last FF of a run is matched, so a run of FF costs one step per byte: `\xff+` backtracked
# through the whole run at each of its bytes (16 KB of FF took 1.3 s). RSTn and TEM carry no length and no
# cost to Pillow: they are skipped here, in C, so the Python loop runs once per segment, at most the limit.
JPEG_MARKER = re.compile(rb"\xff([^\x00\x01\xd0-\xd7\xff])")


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
    order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
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
