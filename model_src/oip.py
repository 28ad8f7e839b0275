"""KServe v2 / Open Inference Protocol over HTTP: the binary tensor extension, model metadata. Pure: no
TorchServe.

The binary extension (Triton's, which every tritonclient uses by default): the body is a JSON header of
`Inference-Header-Content-Length` bytes, then each tensor that carries `parameters.binary_data_size` as raw
bytes, in the order of the header's tensors. A BYTES tensor's raw bytes are its elements, each a 4-byte
little-endian length and that many bytes. Answers use the same layout when the request asks for binary outputs
(`parameters.binary_data_output`, which tritonclient sets whenever it names no outputs, or `binary_data` on a
requested output).

Cost: parse() reads the header once (json.loads) and each element once; the elements are capped by
`max_elements` before any is copied past the cap, so a body of 16 MiB of zero-length elements is refused after
max_elements + 1 steps (tests/test_oip_units.py grows it 10x).
"""

import json
import struct

from model_src.image_checks import InputError

HEADER = "inference-header-content-length"  # lower-cased: HAProxy sends header names in lower case
PLATFORM = "pytorch_torchserve"
# the tensor names the handler reads and answers (any input name is read)
INPUT, OUTPUT = (
    "data",
    "predictions",
)
_LENGTH = struct.Struct("<I")


def header_length(headers: dict) -> str | None:
    """The binary extension's header length from a request's headers (any case), or None: plain JSON."""
    return next((v for k, v in (headers or {}).items() if str(k).lower() == HEADER), None)


def parse(body, length: str, max_elements: int) -> dict:
    """A binary-extension body -> the v2 request, each binary BYTES tensor's `data` a list of raw bytes."""
    if not isinstance(body, (bytes, bytearray)):
        raise InputError(
            f"{HEADER} needs a raw body (no JSON or form Content-Type), got {type(body).__name__}"
        )
    body, length = memoryview(body), str(length)
    # isdigit() alone takes '²' (Netty reads header bytes as Latin-1), which int() refuses
    if not (length.isascii() and length.isdigit()) or not 0 < int(length) <= len(body):
        got = length[:40]
        raise InputError(f"{HEADER} must be a length within the body's {len(body)} bytes, got {got!r}")
    offset = int(length)
    try:
        request = json.loads(bytes(body[:offset]))
    except (ValueError, RecursionError) as e:
        raise InputError(f"the binary request's JSON header does not parse: {e}") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise InputError('KServe v2: "inputs" must be a list of tensors')
    for tensor in inputs:
        size = parameters(tensor, "an input's").get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise InputError(f"binary_data_size {str(size)[:40]} runs past the body's end")
        if tensor.get("datatype") != "BYTES":
            raise InputError(
                f"input {str(tensor.get('name'))[:40]!r}: only BYTES tensors (encoded images) are read"
            )
        tensor["data"] = elements(body[offset : offset + size], max_elements)
        tensor["parameters"] = without(tensor["parameters"], "binary_data_size")
        offset += size
    if offset != len(body):
        raise InputError(
            f"{len(body) - offset} bytes after the binary tensors that no binary_data_size claims"
        )
    return request


def parameters(obj: dict, whose: str) -> dict:
    """A v2 object's `parameters` ({} if absent); InputError if the client sent anything but an object."""
    value = obj.get("parameters")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f'KServe v2: {whose} "parameters" must be an object, got {type(value).__name__}')
    return value


def elements(raw: memoryview, max_elements: int) -> list[bytes]:
    """A BYTES tensor's raw bytes -> its elements (a 4-byte little-endian length, then the bytes each), at
    most max_elements."""
    out: list[bytes] = []
    at = 0
    while at < len(raw):
        if len(out) >= max_elements:
            raise InputError(f"over {max_elements} elements in one BYTES tensor", 413)
        if at + 4 > len(raw):
            raise InputError("a BYTES element's 4-byte length is cut short")
        (n,) = _LENGTH.unpack_from(raw, at)
        if at + 4 + n > len(raw):
            raise InputError(f"a BYTES element of {n} bytes runs past its tensor's end")
        out.append(bytes(raw[at + 4 : at + 4 + n]))
        at += 4 + n
    return out


def pack(data: list[bytes]) -> bytes:
    """BYTES elements -> a tensor's raw bytes (elements() read back): each a 4-byte length, then the bytes."""
    return b"".join(_LENGTH.pack(len(d)) + d for d in data)


def form(shape, body):
    """The handler's answer form (items_from_body's), refined for KServe: a v2 request that asks for binary
    outputs gets ('v2', id, 'binary'); a v1 body ({"instances": [...]}) gets 'v1', answered {"predictions":
    [...]}."""
    if isinstance(shape, tuple) and wants_binary(body, OUTPUT):
        return (*shape, "binary")
    if shape == "list" and isinstance(body, dict) and "instances" in body:
        return "v1"
    return shape


def wants_binary(request, output: str) -> bool:
    """Whether a v2 request asks for `output` in binary: binary_data_output, or binary_data on that output."""
    if not isinstance(request, dict):
        return False
    if parameters(request, "the request's").get("binary_data_output") is True:
        return True
    outputs = request.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InputError('KServe v2: "outputs" must be a list of objects')
    asked = [o for o in outputs if o.get("name") == output]
    return any(parameters(o, "an output's").get("binary_data") is True for o in asked)


def binary_reply(reply: dict) -> tuple[bytes, int]:
    """A v2 answer with BYTES outputs -> (body in the binary layout, its JSON header's length)."""
    header, raw = dict(reply), []
    header["outputs"] = []
    for out in reply["outputs"]:
        data = [d.encode() if isinstance(d, str) else bytes(d) for d in out["data"]]
        blob = pack(data)
        params = {**out.get("parameters", {}), "binary_data_size": len(blob)}
        header["outputs"].append({k: v for k, v in out.items() if k != "data"} | {"parameters": params})
        raw.append(blob)
    text = json.dumps(header).encode()
    return text + b"".join(raw), len(text)


def model_metadata(name: str, versions: list[str], classes: list[str], preprocessing: dict) -> dict:
    """GET /v2/models/{name}: one BYTES input of encoded images in, one BYTES output of JSON top-k dicts
    out."""
    given = preprocessing if isinstance(preprocessing, dict) else {}  # a foreign archive may hold anything
    image = {k: given[k] for k in ("image_size", "channels") if k in given}
    return {
        "name": name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [
            {
                "name": INPUT,
                "datatype": "BYTES",
                "shape": [-1],
                "parameters": {"content": "encoded image (PNG, JPEG, ...), raw or base64", **image},
            }
        ],
        "outputs": [
            {
                "name": OUTPUT,
                "datatype": "BYTES",
                "shape": [-1],
                "parameters": {"content": 'JSON {"<class>": probability}, highest first', "classes": classes},
            }
        ],
    }


def metadata_text(meta: dict, limit: int) -> str:
    """model_metadata's answer as JSON of at most about `limit` bytes: past it the class list is left out (a
    client needs the tensors, not the labels; the front door serves this file from one buffer)."""
    text = json.dumps(meta)
    if len(text) <= limit:
        return text
    outputs = [{**o, "parameters": without(o["parameters"], "classes")} for o in meta["outputs"]]
    return json.dumps({**meta, "outputs": outputs})


def without(d: dict, key: str) -> dict:
    """A copy of `d` without `key`."""
    return {k: v for k, v in d.items() if k != key}
