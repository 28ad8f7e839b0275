"""The soak's bodies (bench/soak.py): bad bodies of every kind the handler refuses, and the KServe forms of an
image (v2 JSON, v2 binary extension, v1) with a bad body of each."""

import base64
import json
import os
import struct

from bench.loadgen import Request
from model_src.oip import HEADER as IHCL


def bad_bodies() -> list[bytes]:
    """Six kinds of body the handler must refuse with a 4xx."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buf, "PNG")
    png = buf.getvalue()
    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0)  # header of a 2.5-gigapixel image
    bomb = (
        png[:8]
        + struct.pack(">I", 13)
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        + png[33:]
    )
    return [
        b"definitely not an image",
        png[: len(png) // 2],  # truncated
        b'{"data": "%%% not base64 %%%"}',
        b'{"image_url": "http://example.com/x.png"}',  # JSON without data
        bomb,
        b"\xff\xd8\xff\xe0" + os.urandom(200),  # JPEG magic, garbage after
    ]


def kserve_bodies(image: bytes, model: str) -> list[Request]:
    """`image` as KServe v2 JSON (base64), v2 binary (raw bytes after the JSON header) and KServe v1."""
    v2 = f"/v2/models/{model}/infer"
    tensor = {"name": "data", "datatype": "BYTES", "shape": [1]}
    as_json = json.dumps({"inputs": [{**tensor, "data": [base64.b64encode(image).decode()]}]}).encode()
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(image) + 4}}]}).encode()
    binary = header + struct.pack("<I", len(image)) + image
    v1 = json.dumps({"instances": [{"data": base64.b64encode(image).decode()}]}).encode()
    return [
        Request(as_json, v2, {"Content-Type": "application/json"}, "v2", model),
        Request(
            binary, v2, {"Content-Type": "application/octet-stream", IHCL: str(len(header))}, "v2", model
        ),
        Request(v1, f"/v1/models/{model}:predict", {"Content-Type": "application/json"}, "v1"),
    ]


def kserve_bad_bodies(model: str) -> list[Request]:
    """One bad body of each KServe form: not base64, a binary header longer than the body, not an image."""
    v2 = f"/v2/models/{model}/infer"
    tensor = {"name": "data", "datatype": "BYTES", "shape": [1], "data": ["%%% not base64 %%%"]}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": 8}}]}).encode()
    v1 = json.dumps({"instances": [{"data": base64.b64encode(b"not an image").decode()}]}).encode()
    return [
        Request(json.dumps({"inputs": [tensor]}).encode(), v2, {"Content-Type": "application/json"}),
        Request(header, v2, {"Content-Type": "application/octet-stream", IHCL: str(len(header) + 100)}),
        Request(v1, f"/v1/models/{model}:predict", {"Content-Type": "application/json"}),
    ]
