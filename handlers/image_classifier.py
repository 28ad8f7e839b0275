"""TorchServe handler: images in, top-k {label: probability} out; explanations and a model card too.

Thin on purpose: decoding and preprocessing come from model_src.preprocessing (the
definition training evaluates with), what the archive holds from its bundle.json (model_src.manifest),
model loading from the backend registry (model_src.backends). What
this file adds is TorchServe's contract: per-request parsing, one batched forward
pass over the good requests, and a per-request status so that one bad image
never fails its neighbours in the batch.

Accepted bodies (each request may carry one image, or a list in the JSON forms):
  raw bytes           curl -T img.png  (or --data-binary @img.png with a binary Content-Type)
  multipart           curl -F data=@img.png         (any field name; several files -> a list, in order)
  JSON + base64       {"data": "<b64>"}  or  {"data": ["<b64>", ...]}  or  ["<b64>", ...]
  KServe v2 JSON      {"inputs": [{"name": "...", "datatype": "BYTES", "shape": [n], "data": ["<b64>", ...]}]}
                      (over OIP gRPC the client sends raw bytes; TorchServe hands them over as base64)

Each request in a batch is one of three kinds, told apart by the header TorchServe sets on it:
  prediction   /predictions/{model}[/{version}], /v2/models/{model}/infer
  explanation  /explanations/{model}[/{version}], /v2/models/{model}/explain: Integrated Gradients
               (model_src/explain.py) for the top-1 class, or the class named by "target" in a JSON body
               or an X-Explain-Target header; "overlay": true (or X-Explain-Overlay: true) adds a PNG
  describe     GET /models/{model}/{version}?customized=true on the management API: the model card
"""

import base64
import binascii
import json
import logging
import os
import re
import resource
import sys
import time

import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from model_src import backends, manifest
from model_src.explain import explain
from model_src.preprocessing import InputError, Preprocessing, sniff_format

# Integrated Gradients steps: the fewest worth answering with, and the number a worker's first explanation
# takes while it measures what one step costs on this model and machine.
MIN_STEPS, FIRST_STEPS = 4, 8

logger = logging.getLogger(__name__)

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
    return value is None or (isinstance(value, (bytes, bytearray, str, list, dict)) and len(value) == 0)


def is_image(value) -> bool:
    try:
        return isinstance(value, (bytes, bytearray)) and bool(sniff_format(value))
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
            "no image in the request. Send it as the body (curl -T img.png, or --data-binary @img.png "
            "-H 'Content-Type: application/octet-stream': curl's default form encoding destroys binary data), "
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
        raise InputError(f"the images in this request are {size:,} bytes, over the limit of {max_bytes:,}", 413)
    return items


def decode_items(items: list) -> list[bytes]:
    return [bytes(i) if isinstance(i, (bytes, bytearray)) else b64decode(i) for i in items]


def is_v2(body) -> bool:
    return isinstance(body, dict) and "inputs" in body


# --- answers -------------------------------------------------------------------------


def top_k(probs: torch.Tensor, labels: list[str], k: int) -> dict:
    """(K,) probabilities -> {label: probability}, highest first, like TorchServe's image_classifier."""
    values, indices = probs.topk(min(k, probs.numel()))
    return {labels[i]: round(v, 6) for v, i in zip(values.tolist(), indices.tolist())}


def v2_response(predictions: list[dict], model_name: str, version: str, request_id: str) -> dict:
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
    return {"code": status, "type": "BadInput" if status < 500 else "InternalServerError", "message": message}


def v2_error(status: int, message: str, model_name: str, version: str, request_id: str) -> dict:
    """An error for a v2 request: HTTP clients get the status and `message`; TorchServe's OIP gRPC
    path ignores per-request status codes and needs the v2 keys, so the error travels as an
    output tensor named "error" there (a body without them would crash its response path)."""
    body = v2_response([error_body(status, message)], model_name, version, request_id)
    body["outputs"][0]["name"] = "error"
    return {**error_body(status, message), **body}


def request_kind(context, idx: int) -> str:
    """TorchServe marks each request of a batch: a batch may mix predictions, explanations and describes."""
    if context.get_request_header(idx, "describe") == "True":
        return "describe"
    return "explain" if context.get_request_header(idx, "explain") == "True" else "predict"


def in_frontend_worker() -> bool:
    """Whether TorchServe's frontend started this process: its worker runs ts/model_service_worker.py
    (WorkerLifeCycle builds that command), however TorchServe was started (scripts, the literal command, KServe)."""
    return sys.argv[0].endswith(os.path.join("ts", "model_service_worker.py"))


def limit_memory(headroom_mb: int) -> int:
    """Cap this process's data (RLIMIT_DATA: heap and private writable mappings, where decoding allocates) at
    its size now plus `headroom_mb`, so that an input past every other check fails its own request with a
    MemoryError (507) instead of growing the worker until the kernel's OOM killer picks some process.
    RLIMIT_AS would also count the address space that torch, ORT and glibc reserve but never touch.
    Returns the ceiling in bytes."""
    with open("/proc/self/status") as f:
        data = int(re.search(r"^VmData:\s+(\d+) kB", f.read(), re.M)[1]) << 10
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    ceiling = data + (headroom_mb << 20)
    ceiling = ceiling if hard == resource.RLIM_INFINITY else min(ceiling, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (ceiling, hard))
    return ceiling


class ImageClassifier(BaseHandler):
    def initialize(self, context):
        properties = context.system_properties
        model_dir = properties.get("model_dir")
        mar = context.manifest["model"]
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        self.configure(yaml_cfg, int(properties.get("batch_size") or 1))
        self.bundle = manifest.read(model_dir)  # what the archive holds, written by export and archiving
        if self.bundle.backend is None:
            raise RuntimeError(f"{manifest.FILE} names no served backend: build the archive with scripts/archive.sh")
        self.labels = self.bundle.class_names
        self.prep = Preprocessing.from_dict(self.bundle.preprocessing)
        backend = backends.get(self.bundle.backend.name)
        self.backend = backend.name
        gpu = properties.get("gpu_id")
        on_gpu = gpu is not None and torch.cuda.is_available() and backend.gpu  # else its kernels are the CPU's
        device = f"cuda:{gpu}" if on_gpu else "cpu"
        self.threads = int(self.config["threads"]) or self.auto_threads(yaml_cfg)
        torch.set_num_threads(self.threads)  # the worker process is the handler's to configure
        self.predictor = backends.load(os.path.join(model_dir, backend.file), backend.name, device, self.threads)
        self.model_name, self.version = mar.get("modelName", ""), mar.get("modelVersion", "")
        self.model_dir = model_dir
        self._explainer = self.card = None  # both made on first use: most workers never explain or describe
        self.step_seconds = None  # measured cost of one Integrated Gradients step
        self.warm_up(int(properties.get("batch_size") or 1))
        # Only a worker the frontend started gets a ceiling: a handler built in-process (tests, the bench)
        # leaves its host process alone. A headroom of 0 sets none.
        headroom = self.config["memory_headroom_mb"]
        ceiling = limit_memory(headroom) if headroom and in_frontend_worker() else None
        self.initialized = True
        logger.info(
            "loaded %s %s: backend=%s threads=%d topk=%d classes=%d memory ceiling=%s MB",
            self.model_name,
            self.version,
            self.backend,
            self.threads,
            self.config["topk"],
            len(self.labels),
            ceiling and ceiling >> 20,
        )

    def configure(self, yaml_cfg: dict, batch_size: int):
        self.config = settings_from(yaml_cfg)
        # Decoding a batch must end well before TorchServe's responseTimeout kills the worker (and every
        # request in the batch): each request gets its share of decode_time_share x responseTimeout.
        self.response_timeout = yaml_cfg["responseTimeout"]
        self.decode_seconds = self.config["decode_time_share"] * self.response_timeout / batch_size

    @staticmethod
    def auto_threads(yaml_cfg: dict) -> int:
        # Split the cores between the workers so they do not oversubscribe each other.
        workers = int(yaml_cfg.get("maxWorkers") or yaml_cfg.get("minWorkers") or 1)
        return max(1, len(os.sched_getaffinity(0)) // workers)  # the cores this process may use, not the host's

    def warm_up(self, batch_size: int):
        """Run the model once per shape it will see first, so no user request pays for it."""
        x = torch.zeros(1, self.prep.channels, self.prep.image_size, self.prep.image_size)
        for n in sorted({1, batch_size}):
            self.predictor(x.expand(n, -1, -1, -1).contiguous())

    def decode_all(self, encoded: list[bytes], convert=None) -> list:
        """Encoded images -> convert(decoded image) each (the training evaluation transform for predictions).

        The pixel cap is one budget for the whole request: 32 images each just under it would
        take minutes to decode, time the worker out and fail every neighbour in its batch. Time is
        budgeted too: one decode cannot be interrupted, but the request stops before the next one."""
        cap = budget = self.config["max_image_pixels"]
        out, start = [], time.perf_counter()
        for data in encoded:
            if out and (spent := time.perf_counter() - start) > self.decode_seconds:
                raise InputError(
                    f"decoding this request's first {len(out)} images took {spent:.1f} s, over its share "
                    f"of the response timeout ({self.decode_seconds:.1f} s): send fewer or smaller images",
                    413,
                )
            try:
                img = self.prep.decode(data, budget)
            except InputError as e:
                if e.status == 413 and budget < cap:
                    raise InputError(f"the images in this request have over {cap:,} pixels together", 413) from None
                raise
            budget -= self.prep.pixel_cost(img)  # a thin image costs its pixels after resizing
            out.append(convert(img) if convert else img)
        return out

    def handle(self, data, context):
        start = time.perf_counter()
        images, owners, explanations, answers = [], [], [], [None] * len(data)
        for idx, row in enumerate(data):
            kind = request_kind(context, idx)
            if kind == "describe":  # the model card, for GET /models/{name}/{version}?customized=true
                answers[idx] = self.answer(context, idx, [self.describe()], "one")
                continue
            body = None
            try:
                body = body_of(row)
                items, shape = items_from_body(body)
                limit = self.config["max_images_per_explanation" if kind == "explain" else "max_images_per_request"]
                items = check_items(items, limit, self.config["max_request_image_bytes"])
                if kind == "explain":
                    options = self.explain_options(context, idx, body)  # checked before any decoding
                    explanations.append((idx, body, shape, options, self.decode_all(decode_items(items))))
                    continue
                tensors = self.decode_all(decode_items(items), self.prep)
            except InputError as e:
                answers[idx] = self.reject(context, idx, body, e.status, str(e))
                continue
            except MemoryError:  # past the worker's ceiling (memory_headroom_mb): this request fails, not the box
                answers[idx] = self.reject(context, idx, body, 507, "this request needs more memory than a worker has")
                continue
            except Exception as e:  # a bug, not bad input: answer 500 for this request only
                logger.exception("unexpected error preparing request %d", idx)
                answers[idx] = self.reject(context, idx, body, 500, f"internal error: {e.__class__.__name__}")
                continue
            images += tensors
            owners.append((idx, len(tensors), shape))
        preprocess_ms = (time.perf_counter() - start) * 1000

        if images:
            t0 = time.perf_counter()
            probs = torch.softmax(self.predictor(torch.stack(images)), dim=1)
            self.record(context, "InferenceTime", (time.perf_counter() - t0) * 1000)
            predictions = iter([top_k(p, self.labels, self.config["topk"]) for p in probs])
            for idx, n, shape in owners:
                answers[idx] = self.answer(context, idx, [next(predictions) for _ in range(n)], shape)
        if explanations:
            self.explain_all(context, explanations, answers, start)
        self.record(context, "PreprocessTime", preprocess_ms)
        self.record(context, "HandlerTime", (time.perf_counter() - start) * 1000)
        return answers

    def answer(self, context, idx: int, results: list, shape) -> dict | list:
        context.set_response_content_type(idx, "application/json")
        if shape == "one":
            return results[0]
        if shape == "list":
            return results
        return v2_response(results, self.model_name, self.version, shape[1])

    # --- explanations ----------------------------------------------------------------------

    def explain_all(self, context, explanations: list, answers: list, start: float):
        """Explanations run after the batch's predictions, one image at a time, within their share of the
        response timeout: each gets the Integrated Gradients steps that fit in what is left of it (measured
        per worker), and one that would not fit gets a 503 to retry. So a batch of slow explanations never
        runs into the timeout that would kill the worker and every request in its batch."""
        deadline = start + self.config["explain_time_share"] * self.response_timeout
        for idx, body, shape, (target, overlay), imgs in explanations:
            t0, results = time.perf_counter(), []
            try:
                for img in imgs:
                    steps = self.affordable_steps(deadline - time.perf_counter())
                    began = time.perf_counter()
                    results.append(explain(self.explainer(), self.prep, img, self.labels, target, steps, overlay))
                    self.step_seconds = (time.perf_counter() - began) / steps
            except InputError as e:
                answers[idx] = self.reject(context, idx, body, e.status, str(e))
                continue
            except Exception as e:
                logger.exception("unexpected error explaining request %d", idx)
                answers[idx] = self.reject(context, idx, body, 500, f"internal error: {e.__class__.__name__}")
                continue
            self.record(context, "ExplainTime", (time.perf_counter() - t0) * 1000)
            answers[idx] = self.answer(context, idx, results, shape)

    def affordable_steps(self, seconds_left: float) -> int:
        """explain_steps, or fewer when the time left (with a 1.5x margin on the measured cost of a step) holds
        fewer; 503 below MIN_STEPS. The worker's first explanation takes FIRST_STEPS and measures the cost."""
        want = self.config["explain_steps"]
        steps = min(want, FIRST_STEPS) if self.step_seconds is None else int(seconds_left / (1.5 * self.step_seconds))
        if seconds_left <= 0 or steps < min(MIN_STEPS, want):
            raise InputError("this batch's time for explanations is spent: retry, or send fewer images", 503)
        return min(steps, want)

    def explain_options(self, context, idx: int, body) -> tuple[int | None, bool]:
        """(class index to explain or None for the top-1, whether to add a PNG overlay), from the JSON body's
        "target"/"overlay" or the X-Explain-Target/X-Explain-Overlay headers. 501 if nothing can be explained."""
        self.explainer()
        headers = {k.lower(): v for k, v in (context.get_all_request_header(idx) or {}).items()}
        fields = body if isinstance(body, dict) else {}
        target = fields.get("target", headers.get("x-explain-target"))
        overlay = fields.get("overlay", headers.get("x-explain-overlay", False))
        if target is not None and str(target) not in self.labels:
            names = ", ".join(self.labels[:20]) + (", ..." if len(self.labels) > 20 else "")
            raise InputError(f"unknown target class {str(target)[:100]!r}; the classes are {names}")
        return (None if target is None else self.labels.index(str(target))), str(overlay).lower() in ("true", "1")

    def explainer(self):
        """The differentiable model explanations run on: the served one, or the eager weights an ONNX or int8
        archive carries beside its served file."""
        if self._explainer is None:
            if backends.get(self.backend).differentiable:
                self._explainer = self.predictor.model
            elif path := self.eager_weights():
                self._explainer = backends.load(path, backends.reference().name).model
            else:
                raise InputError(
                    f"the {self.backend} backend has no gradients to explain with and this archive carries no "
                    f"eager weights ({backends.reference().file}) beside it: rebuild it with scripts/archive.sh",
                    501,
                )
        return self._explainer

    def eager_weights(self) -> str | None:
        """The eager weights an ONNX or int8 archive carries for explanations (None: it carries none)."""
        path = os.path.join(self.model_dir, self.bundle.files.get(backends.reference().name, ""))
        return path if os.path.isfile(path) else None

    # --- the model card ----------------------------------------------------------------------

    def describe(self) -> dict:
        if self.card is None:  # built once
            self.card = self.make_card()
        return self.card

    def make_card(self) -> dict:
        """The model card, from the archive's manifest alone."""
        b, prov, archive = self.bundle, self.bundle.provenance, self.bundle.archive
        eager = backends.reference()
        if backends.get(self.backend).differentiable:
            explained_by = "the served file"
        else:
            explained_by = f"eager weights ({eager.file}) shipped beside it" if self.eager_weights() else None
        return {
            "model": self.model_name,
            "version": self.version,
            "backend": self.backend,
            "classes": self.labels,
            "preprocessing": self.prep.to_dict(),
            "architecture": b.model_args,
            "training": {
                "data": prov.data,
                "source": prov.source,
                "command": prov.command,
                "epochs": prov.metrics.epochs_done,
                "best_val_acc": prov.metrics.best_val_acc,
                "best_epoch": prov.metrics.best_epoch,
                "final_val_acc": prov.metrics.final_val_acc,
            },
            "export_check": {k: v for k, v in b.checks.get("formats", {}).get(self.backend, {}).items() if k != "file"},
            "built": archive and archive.built,
            # The archive's own SHA-256 is in its .sha256 sidecar and the journal: a worker hashes nothing.
            "archive": archive and {"file": archive.file, "built": archive.built, "digests": archive.digests},
            "explanations": {
                "method": "integrated_gradients (captum)",
                "steps": self.config["explain_steps"],
                "model": explained_by,
            },
        }

    def reject(self, context, idx: int, body, status: int, message: str) -> dict:
        context.set_response_status(status, message[:200], idx)
        context.set_response_content_type(idx, "application/json")
        self.count(context, "RejectedInputs")
        if is_v2(body):
            return v2_error(status, message, self.model_name, self.version, str(body.get("id", "")))
        return error_body(status, message)

    # Custom metrics: declared in serving/metrics.yaml so TorchServe exports them to Prometheus.
    def record(self, context, name: str, ms: float):
        """A time measured in ms, exported as the histogram `<name>_seconds` in seconds: TorchServe's histograms
        have the Prometheus client's fixed buckets (5 ms ... 10 s), which only fit times in the base unit."""
        context.metrics.add_time(f"{name}_seconds", round(ms / 1000, 6), None, "s", metric_type=MetricTypes.HISTOGRAM)

    def count(self, context, name: str):
        context.metrics.add_counter(name, 1, None)
