"""The serving protocol: one request (its body or form fields and its headers) in, a typed Request out, and
the answer bodies back. Pure functions, no TorchServe: the handler is the adapter between these and
TorchServe.

Accepted bodies (each request may carry one image, or a list in the JSON forms):
  raw bytes           curl -T img.png  (or --data-binary @img.png with a binary Content-Type)
  multipart           curl -F data=@img.png         (any field name; several files -> a list, in order)
  JSON + base64       {"data": "<b64>"}  or  {"data": ["<b64>", ...]}  or  ["<b64>", ...]
  KServe v2 JSON      {"inputs": [{"name": "...", "datatype": "BYTES", "shape": [n], "data": ["<b64>", ...]}]}
                      (over OIP gRPC the client sends raw bytes; TorchServe hands them over as base64)
  KServe v2 binary    tritonclient's binary tensor extension: raw image bytes after the JSON header
                      (model_src/oip.py)
  KServe v1 JSON      {"instances": ["<b64>", ...]}, answered {"predictions": [...]}

Each request is one of three kinds, told apart by the header TorchServe sets on it:
  predict    /predictions/{model}[/{version}], /v2/models/{model}/infer
  explain    /explanations/{model}[/{version}], /v2/models/{model}/explain: the class named by "target" in a
             JSON body or an X-Explain-Target header (else the top-1); "overlay": true (or X-Explain-Overlay:
             true)
  describe   GET /models/{model}/{version}?customized=true on the management API: the model card

The cheap checks (count, types, sizes) run before anything is decoded; decoding has a pixel and a time budget.
The limits come from the handler's settings (model-config.yaml's `handler:` section), read here too.
"""

import base64
import binascii
import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from model_src import oip
from model_src.image_checks import InputError, sniff_format
from model_src.preprocessing import Preprocessing

# --- settings ------------------------------------------------------------------------------------

# The handler's settings live in model-config.yaml's `handler:` section (shipped in every archive) and
# nowhere else: these are the keys it needs, and a worker without one of them refuses to start.
SETTINGS = (
    "topk",
    "max_image_pixels",
    "max_images_per_request",
    "max_request_image_bytes",
    "decode_time_share",
    "threads",
    "explain_steps",
    "max_images_per_explanation",
    "explain_time_share",
    "memory_headroom_mb",
)


def settings_from(yaml_cfg: dict) -> dict:
    """model-config.yaml -> the handler's settings; RuntimeError naming any that is missing."""
    settings = yaml_cfg.get("handler") or {}
    missing = [f"handler.{key}" for key in SETTINGS if key not in settings]
    missing += [] if "responseTimeout" in yaml_cfg else ["responseTimeout"]  # the decoding time budget's base
    if missing:
        raise RuntimeError(f"model-config.yaml lacks {', '.join(missing)}: see handlers/model-config.yaml")
    return settings


# --- request parsing: row -> list of encoded images ------------------------------------


def b64decode(text) -> bytes:
    """Base64 text as bytes (line breaks and a data: URL prefix allowed); InputError if not base64."""
    if not isinstance(text, str):
        raise InputError(f"expected a base64 string, got {type(text).__name__}")
    text = "".join(text.split())  # `base64` and MIME wrap lines at 76 columns; validate=True refuses newlines
    if text.startswith("data:") and "," in text:  # data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("invalid base64 image data") from None


def items_from_json(body) -> tuple[list, str | tuple]:
    """JSON body -> (its image items, still base64 and unchecked; form of the answer: 'one', 'list' or
    ('v2', request id)). Nothing is decoded here, so the cheap checks can run first."""
    if is_v2(body):
        inputs = body["inputs"]
        if not isinstance(inputs, list) or not inputs or not isinstance(inputs[0], dict):
            raise InputError('KServe v2: "inputs" must be a non-empty list of tensors')
        data = inputs[0].get("data")
        if not isinstance(data, list):
            raise InputError('KServe v2: inputs[0]["data"] must be a list of base64 strings')
        return data, ("v2", str(body.get("id", "")))
    if isinstance(body, dict):
        for key in ("data", "image", "instances"):
            if key in body:
                body = body[key]
                break
        else:
            raise InputError('JSON body needs a "data" field holding a base64 image (or a list of them)')
    if isinstance(body, str):
        return [body], "one"
    if isinstance(body, list):
        return body, "list"
    raise InputError(f'JSON "data" must be a base64 string or a list of them, got {type(body).__name__}')


def is_empty(value) -> bool:
    """True for None and for an empty bytes, str, list or dict."""
    return value is None or (isinstance(value, (bytes, bytearray, str, list, dict)) and len(value) == 0)


def is_image(value) -> bool:
    """True if `value` is bytes that start like an image of an accepted format."""
    try:
        # magic: 12 bytes
        return isinstance(value, (bytes, bytearray)) and bool(sniff_format(bytes(value[:64])))
    except InputError:
        return False


def files_of(fields: dict) -> list:
    """A multipart request's image files, in the order sent (curl -F a=@x.png -F b=@y.png). Short text fields
    beside a file (a name, a note) are not images and are left alone; any other field that is not an image
    of an accepted format is refused, so that no file is ever dropped without a word."""
    files, others = [], []
    for name, value in fields.items():
        if is_image(value):
            files.append(value)
        elif not is_text(value):
            others.append(name)
    if files and others:
        raise InputError(
            f"multipart field {others[0]!r} is not an image of an accepted format; send image files only", 415
        )
    return files


def is_text(value) -> bool:
    """True for a str, or for at most 1024 bytes of printable UTF-8."""
    if isinstance(value, str):
        return True
    try:
        return len(value) <= 1024 and bytes(value).decode("utf-8").isprintable()
    except (TypeError, ValueError):  # not bytes-like ([-1] from a JSON field), or not UTF-8
        return False


def body_of(row: dict):
    """One TorchServe request (its body or form fields) -> the image payload: bytes, base64 text, a list of
    files, or a parsed JSON value (TorchServe parses application/json itself; other JSON arrives as bytes)."""
    fields = {k: v for k, v in row.items() if not is_empty(v)}
    value = next((fields[k] for k in ("data", "body", "file", "image") if k in fields), None)
    if len(fields) > 1:  # multipart with several fields: every image file, in order
        files = files_of(fields)
        value = files if len(files) > 1 else (files[0] if files else value)
    if value is None:
        raise InputError(
            "no image in the request. Send it as the body (curl -T img.png, or --data-binary @img.png -H "
            "'Content-Type: application/octet-stream': curl's default form encoding destroys binary data), "
            'as a form field (curl -F data=@img.png) or as base64 JSON ({"data": "<base64>"})'
        )
    if isinstance(value, (bytes, bytearray)) and value[:1] in (b"{", b"["):
        try:
            return json.loads(value)
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or nested too deep
            raise InputError(f"body looks like JSON but does not parse: {e}") from None
    return value


def items_from_body(body) -> tuple[list, str | tuple]:
    """body_of()'s payload -> (image items: bytes or base64 text, form of the answer)."""
    if isinstance(body, list) and body and all(isinstance(b, (bytes, bytearray)) for b in body):
        return body, "list"  # several multipart files
    if isinstance(body, (dict, list)):
        return items_from_json(body)
    if isinstance(body, str):  # text/* bodies arrive decoded: accept base64 text
        return [body], "one"
    if not isinstance(body, (bytes, bytearray)):  # a JSON number or boolean
        raise InputError(f"expected an image, got a JSON {type(body).__name__}")
    return [body], "one"


def check_items(items: list, max_images: int, max_bytes: int) -> list:
    """Count, types and sizes, before any item is decoded: a 16 MiB list of 2.4 M tiny items is refused
    in microseconds instead of after 2.4 M base64 decodes. Returns the items as bytes or base64 text."""
    if not items:
        raise InputError("the request holds an empty list of images")
    if len(items) > max_images:
        raise InputError(f"{len(items):,} images in one request; the limit is {max_images}", 413)
    items = [item.get("data") if isinstance(item, dict) else item for item in items]  # [{"data": "<b64>"}]
    for item in items:
        if not isinstance(item, (str, bytes, bytearray)):
            raise InputError(f"expected a base64 string, got {type(item).__name__}")
    size = sum(len(i) if isinstance(i, (bytes, bytearray)) else len(i) * 3 // 4 for i in items)
    if size > max_bytes:
        raise InputError(
            f"the images in this request are {size:,} bytes, over the limit of {max_bytes:,}", 413
        )
    return items


def decode_items(items: list) -> list[bytes]:
    """A request's image items as bytes: bytes as they are, anything else decoded as base64."""
    return [bytes(i) if isinstance(i, (bytes, bytearray)) else b64decode(i) for i in items]


def is_v2(body) -> bool:
    """True if `body` is a KServe v2 request (a dict with "inputs")."""
    return isinstance(body, dict) and "inputs" in body


# --- the typed request ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one request may hold, from model-config.yaml's handler settings."""

    images: int  # per prediction request
    explain_images: int  # per explanation request
    image_bytes: int  # per request, all images together

    @classmethod
    def from_settings(cls, settings: dict) -> "Limits":
        """The limits from the handler settings' max_images_per_request, max_images_per_explanation and
        max_request_image_bytes."""
        return cls(
            settings["max_images_per_request"],
            settings["max_images_per_explanation"],
            settings["max_request_image_bytes"],
        )


@dataclass
class Request:
    """One request of a batch, read as far as it parsed: `body` is set before the later checks can fail, so an
    error answer keeps the v2 form of a v2 request."""

    kind: str  # predict | explain | describe
    headers: dict = field(default_factory=dict)
    body: Any = None  # the payload body_of() found
    items: list = field(default_factory=list)  # checked, still encoded: bytes or base64 text
    shape: str | tuple = "one"  # the answer's form: 'one', 'list', 'v1' or ('v2', request id[, 'binary'])
    target: str | None = None  # explain: the class name to explain (None: the top-1)
    overlay: bool = False  # explain: add a PNG overlay

    @classmethod
    def of(cls, headers: dict | None) -> "Request":
        """TorchServe marks each request of a batch: a batch may mix predictions, explanations and
        describes."""
        headers = headers or {}
        kind = "describe" if headers.get("describe") == "True" else "predict"
        return cls("explain" if headers.get("explain") == "True" else kind, headers)

    def read(self, row: dict, limits: Limits) -> "Request":
        """Parse and check the row (nothing decoded yet); InputError with the status to answer."""
        head = oip.header_length(self.headers)  # the v2 binary extension: raw image bytes after a JSON header
        self.body = oip.parse(row.get("body"), head, limits.images) if head else body_of(row)
        items, shape = items_from_body(self.body)
        # KServe: v1 {"predictions": [...]}, v2 binary outputs when asked
        self.shape = oip.form(shape, self.body)
        explaining = self.kind == "explain"
        self.items = check_items(
            items, limits.explain_images if explaining else limits.images, limits.image_bytes
        )
        if explaining:
            self.target, self.overlay = explain_options(self.body, self.headers)
        return self

    @property
    def v2_id(self) -> str | None:
        """The request id of a v2 request (its error answers keep the v2 form), else None."""
        return str(self.body.get("id", "")) if is_v2(self.body) else None


def read_request(row: dict, headers: dict | None, limits: Limits) -> Request:
    """One TorchServe row and its headers -> a checked Request; InputError with the status to answer."""
    return Request.of(headers).read(row, limits)


def explain_options(body, headers: dict) -> tuple[str | None, bool]:
    """(class name to explain or None for the top-1, whether to add a PNG overlay), from the JSON body's
    "target"/"overlay" or the X-Explain-Target/X-Explain-Overlay headers."""
    headers = {k.lower(): v for k, v in headers.items()}
    fields = body if isinstance(body, dict) else {}
    target = fields.get("target", headers.get("x-explain-target"))
    overlay = fields.get("overlay", headers.get("x-explain-overlay", False))
    return (None if target is None else str(target)), str(overlay).lower() in ("true", "1")


def target_index(target: str | None, labels: list[str]) -> int | None:
    """A class name -> its index (None stays None: the top-1); 400 naming the classes if it is none of
    them."""
    if target is None:
        return None
    if target not in labels:
        names = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
        raise InputError(f"unknown target class {target[:100]!r}; the classes are {names}")
    return labels.index(target)


# --- decoding --------------------------------------------------------------------------------------


def decode_all(prep: Preprocessing, encoded: list, max_pixels: int, seconds: float, convert=None) -> list:
    """Encoded images (bytes or base64 text) -> convert(decoded image) each (the training evaluation transform
    for predictions).

    The pixel cap is one budget for the whole request: 32 images each just under it would
    take minutes to decode, time the worker out and fail every neighbour in its batch. Time is
    budgeted too (`seconds`): one decode cannot be interrupted, but the request stops before the next one."""
    budget, start = max_pixels, time.perf_counter()
    out: list = []
    for data in decode_items(encoded):
        if out and (spent := time.perf_counter() - start) > seconds:
            raise InputError(
                f"decoding this request's first {len(out)} images took {spent:.1f} s, over its share "
                f"of the response timeout ({seconds:.1f} s): send fewer or smaller images",
                413,
            )
        try:
            img = prep.decode(data, budget)
        except InputError as e:
            if e.status == 413 and budget < max_pixels:
                raise InputError(
                    f"the images in this request have over {max_pixels:,} pixels together", 413
                ) from None
            raise
        budget -= prep.pixel_cost(img)  # a thin image costs its pixels after resizing
        out.append(convert(img) if convert else img)
    return out


# --- answers -------------------------------------------------------------------------


def top_k(probs: torch.Tensor, labels: list[str], k: int) -> dict:
    """(K,) probabilities -> {label: probability}, highest first, like TorchServe's image_classifier."""
    values, indices = probs.topk(min(k, probs.numel()))
    return {labels[i]: round(v, 6) for v, i in zip(values.tolist(), indices.tolist())}


def answer_body(results: list, shape: str | tuple, model_name: str, version: str) -> dict | list:
    """A request's results in the form it was asked in."""
    if shape == "one":
        return results[0]
    if shape == "list":
        return results
    if shape == "v1":
        return {"predictions": results}
    return v2_response(results, model_name, version, shape[1])


def v2_response(predictions: list[dict], model_name: str, version: str, request_id: str) -> dict:
    """The KServe v2 response: one BYTES output "predictions" holding each prediction as JSON."""
    # TorchServe's OIP gRPC frontend reads id, model_name, model_version and outputs[].name/datatype/
    # shape/data from this JSON; a missing key crashes its response path and kills the worker.
    return {
        "id": request_id,
        "model_name": model_name,
        "model_version": version,
        "outputs": [
            {
                "name": "predictions",
                "datatype": "BYTES",
                "shape": [len(predictions)],
                "data": [json.dumps(p) for p in predictions],
            }
        ],
    }


def error_body(status: int, message: str) -> dict:
    """TorchServe's error JSON for `status`: type BadInput below 500, else InternalServerError."""
    return {"code": status, "type": "BadInput" if status < 500 else "InternalServerError", "message": message}


def v2_error(status: int, message: str, model_name: str, version: str, request_id: str) -> dict:
    """An error for a v2 request: HTTP clients get the status and `message`; TorchServe's OIP gRPC
    path ignores per-request status codes and needs the v2 keys, so the error travels as an
    output tensor named "error" there (a body without them would crash its response path)."""
    body = v2_response([error_body(status, message)], model_name, version, request_id)
    body["outputs"][0]["name"] = "error"
    return {**error_body(status, message), **body, "error": message}  # "error": the v2 error shape


def error_answer(status: int, message: str, request: Request | None, model_name: str, version: str) -> dict:
    """The error body for a request, in its protocol's form."""
    if request is not None and (request_id := request.v2_id) is not None:
        return v2_error(status, message, model_name, version, request_id)
    return error_body(status, message)
