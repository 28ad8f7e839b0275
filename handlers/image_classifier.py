"""TorchServe handler: images in, top-k {label: probability} out; explanations and a model card too.

Only TorchServe's adapter: request parsing, decoding budgets and answer shapes are model_src/protocol.py, the
explanation scheduler model_src/explain.py, preprocessing model_src/preprocessing.py (the definition
training evaluates with), what the archive holds its bundle.json (model_src/manifest.py), model loading the
backend registry (model_src/backends/). What this file adds is TorchServe's contract: one batched
forward pass over the good requests of a batch, and a per-request status so that one bad image never fails its
neighbours in the batch. The accepted bodies and the three kinds of request are listed in
model_src/protocol.py.
"""

import functools
import logging
import os
import re
import resource
import sys
import time

import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from model_src import backends, manifest, oip, protocol
from model_src.cores import threads_per_worker, usable_cores, workers_of
from model_src.explain import StepBudget, explain
from model_src.image_checks import InputError
from model_src.preprocessing import Preprocessing

logger = logging.getLogger(__name__)


def in_frontend_worker() -> bool:
    """Whether TorchServe's frontend started this process: its worker runs ts/model_service_worker.py
    (WorkerLifeCycle builds that command), however TorchServe was started (scripts, the literal command,
    KServe)."""
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


def devices(gpu_id, backend: backends.Backend, cuda: bool) -> tuple[str, str]:
    """(where the served backend runs, where explanations run) in a worker TorchServe gave `gpu_id` (None in a
    CPU worker): its GPU for a backend that runs there, the CPU for one that cannot (ONNX Runtime's CPU
    provider), and the eager weights that explain such a backend on the GPU all the same."""
    gpu = f"cuda:{gpu_id}" if gpu_id is not None and cuda else "cpu"
    return (gpu if backend.gpu else "cpu"), gpu


class ImageClassifier(BaseHandler):
    """The archive's handler: batched prediction, explanations and the model card, per-request errors."""

    def initialize(self, context):
        """TorchServe's per-worker setup: read the archive's manifest and settings, load the served
        backend, warm it up and cap the worker's memory."""
        properties = context.system_properties
        model_dir = properties.get("model_dir")
        mar = context.manifest["model"]
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        self.configure(yaml_cfg, int(properties.get("batch_size") or 1))
        self.bundle = manifest.read(model_dir)  # what the archive holds, written by export and archiving
        if self.bundle.backend is None:
            raise RuntimeError(
                f"{manifest.FILE} names no served backend: build the archive with scripts/archive.sh"
            )
        self.labels = self.bundle.class_names
        self.prep = Preprocessing.from_dict(self.bundle.preprocessing)
        backend = backends.get(self.bundle.backend.name)
        self.backend = backend.name
        device, self.explain_device = devices(properties.get("gpu_id"), backend, torch.cuda.is_available())
        self.threads = int(self.config["threads"]) or self.auto_threads(yaml_cfg)
        torch.set_num_threads(self.threads)  # the worker process is the handler's to configure
        self.predictor = backends.load(
            os.path.join(model_dir, backend.file), backend.name, device, self.threads
        )
        self.model_name, self.version = mar.get("modelName", ""), mar.get("modelVersion", "")
        self.model_dir = model_dir
        self._explainer = self.card = None  # both made on first use: most workers never explain or describe
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
        """Read the handler settings of model-config.yaml: request limits, decode time per request (of a
        `batch_size` batch) and the explanation step budget."""
        self.config = protocol.settings_from(yaml_cfg)
        # Decoding a batch must end well before TorchServe's responseTimeout kills the worker (and every
        # request in the batch): each request gets its share of decode_time_share x responseTimeout.
        self.response_timeout = yaml_cfg["responseTimeout"]
        self.decode_seconds = self.config["decode_time_share"] * self.response_timeout / batch_size
        self.limits = protocol.Limits.from_settings(self.config)
        self.step_budget = StepBudget(self.config["explain_steps"])  # measures a step's cost per worker

    @staticmethod
    def auto_threads(yaml_cfg: dict) -> int:
        """Threads per worker: the cores this process may use split between the archive's workers
        (model_src/cores.py), so they do not oversubscribe each other."""
        cores = usable_cores()
        return threads_per_worker(workers_of(yaml_cfg, cores), cores)

    def warm_up(self, batch_size: int):
        """Run the model once per shape it will see first, so no user request pays for it."""
        x = torch.zeros(1, self.prep.channels, self.prep.image_size, self.prep.image_size)
        for n in sorted({1, batch_size}):
            self.predictor(x.expand(n, -1, -1, -1).contiguous())

    def decode_all(self, encoded: list, convert=None) -> list:
        """Encoded images -> convert(decoded image) each, within the request's pixel and time budgets."""
        return protocol.decode_all(
            self.prep, encoded, self.config["max_image_pixels"], self.decode_seconds, convert
        )

    def handle(self, data, context):
        """TorchServe's entry point for a batch: one forward pass over its images, then its explanations;
        returns one answer per request, a bad request failing alone."""
        start = time.perf_counter()
        images, owners, explanations, answers = [], [], [], [None] * len(data)
        for idx, row in enumerate(data):
            request = protocol.Request.of(context.get_all_request_header(idx))
            if request.kind == "describe":  # the model card, for GET /models/{name}/{version}?customized=true
                answers[idx] = self.answer(context, idx, [self.describe()], "one")
                continue
            try:
                prepared = self.prepare(idx, request, row, explanations)
            except Exception as e:
                answers[idx] = self.fail(context, idx, request, e, "preparing")
                continue
            if prepared is None:  # an explanation: it runs after the batch's predictions
                continue
            images += prepared
            owners.append((idx, len(prepared), request.shape))
        x = self.prep.batch(images) if images else None  # each image normalised straight into its batch row
        preprocess_ms = (time.perf_counter() - start) * 1000

        if x is not None:
            t0 = time.perf_counter()
            probs = torch.softmax(self.predictor(x), dim=1)
            self.record(context, "InferenceTime", (time.perf_counter() - t0) * 1000)
            predictions = iter([protocol.top_k(p, self.labels, self.config["topk"]) for p in probs])
            for idx, n, shape in owners:
                answers[idx] = self.answer(context, idx, [next(predictions) for _ in range(n)], shape)
        if explanations:
            self.explain_all(context, explanations, answers, start)
        self.record(context, "PreprocessTime", preprocess_ms)
        self.record(context, "HandlerTime", (time.perf_counter() - start) * 1000)
        return answers

    def prepare(self, idx: int, request, row: dict, explanations: list) -> list | None:
        """Read and decode one request: a prediction's images at the model's size and mode (`handle`
        normalises the batch's together), or None for an explanation (queued instead)."""
        request.read(row, self.limits)  # the cheap checks: nothing is decoded yet
        if request.kind != "explain":
            return self.decode_all(request.items, self.prep.prepare)
        self.explainer()  # 501 before any decoding if this archive cannot explain
        target = protocol.target_index(request.target, self.labels)
        explanations.append((idx, request, target, self.decode_all(request.items)))
        return None

    def answer(self, context, idx: int, results: list, shape) -> dict | list | bytes:
        """Request `idx`'s answer in the form it asked for: JSON, or v2 binary bytes with headers set."""
        context.set_response_content_type(idx, "application/json")
        reply = protocol.answer_body(results, shape, self.model_name, self.version)
        if shape[-1] != "binary":
            return reply
        body, length = oip.binary_reply(reply)  # the v2 binary extension, as the request asked
        context.set_response_header(idx, "Inference-Header-Content-Length", str(length))
        context.set_response_content_type(idx, "application/octet-stream")
        return body

    # --- explanations ----------------------------------------------------------------------

    def explain_all(self, context, explanations: list, answers: list, start: float):
        """Explanations run after the batch's predictions, one image at a time, within their share of the
        response timeout (model_src/explain.py's StepBudget): a 503 to retry for those that do not fit."""
        deadline = start + self.config["explain_time_share"] * self.response_timeout
        for idx, request, target, imgs in explanations:
            t0 = time.perf_counter()
            explain_one = functools.partial(self.explain_image, target=target, overlay=request.overlay)
            try:
                results = self.step_budget.explain_each(imgs, deadline, explain_one)
            except Exception as e:
                answers[idx] = self.fail(context, idx, request, e, "explaining")
                continue
            self.record(context, "ExplainTime", (time.perf_counter() - t0) * 1000)
            answers[idx] = self.answer(context, idx, results, request.shape)

    def explain_image(self, img, steps: int, target: int | None, overlay: bool) -> dict:
        """One decoded image's explanation answer, with `steps` integration steps."""
        return explain(self.explainer(), self.prep, img, self.labels, target, steps, overlay)

    def explainer(self):
        """The differentiable model explanations run on: the served one, or the eager weights an ONNX or int8
        archive carries beside its served file."""
        if self._explainer is None:
            if backends.get(self.backend).differentiable:
                self._explainer = self.predictor.model
            elif path := self.eager_weights():
                self._explainer = backends.load(path, backends.reference().name, self.explain_device).model
            else:
                raise InputError(
                    f"the {self.backend} backend has no gradients to explain with and this archive carries "
                    f"no eager weights ({backends.reference().file}) beside it: rebuild it with "
                    "scripts/archive.sh",
                    501,
                )
        return self._explainer

    def eager_weights(self) -> str | None:
        """The eager weights an ONNX or int8 archive carries for explanations (None: it carries none)."""
        path = os.path.join(self.model_dir, self.bundle.files.get(backends.reference().name, ""))
        return path if os.path.isfile(path) else None

    # --- the model card ----------------------------------------------------------------------

    def describe(self) -> dict:
        """The model card (built on first call, then kept)."""
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
            "export_check": {
                k: v for k, v in b.checks.get("formats", {}).get(self.backend, {}).items() if k != "file"
            },
            "built": archive and archive.built,
            # The archive's own SHA-256 is in its .sha256 sidecar and the journal: a worker hashes nothing.
            "archive": archive and {"file": archive.file, "built": archive.built, "digests": archive.digests},
            "explanations": {
                "method": "integrated_gradients (captum)",
                "steps": self.config["explain_steps"],
                "model": explained_by,
            },
        }

    def fail(self, context, idx: int, request, error: Exception, doing: str) -> dict:
        """An exception while serving one request (called in its except block) -> that request's error answer:
        bad input says why; past the worker's memory ceiling (memory_headroom_mb) 507, so this request fails
        and not the box; anything else is a bug: 500 for this request only."""
        if isinstance(error, InputError):
            return self.reject(context, idx, request, error.status, str(error))
        if isinstance(error, MemoryError):
            return self.reject(context, idx, request, 507, "this request needs more memory than a worker has")
        logger.exception("unexpected error %s request %d", doing, idx)
        return self.reject(context, idx, request, 500, f"internal error: {error.__class__.__name__}")

    def reject(self, context, idx: int, request, status: int, message: str) -> dict:
        """Set request `idx`'s error status, count it in RejectedInputs; return its error body."""
        context.set_response_status(status, message[:200], idx)
        context.set_response_content_type(idx, "application/json")
        self.count(context, "RejectedInputs")
        return protocol.error_answer(status, message, request, self.model_name, self.version)

    # Custom metrics: declared in serving/metrics.yaml so TorchServe exports them to Prometheus. Each call
    # passes its own `dimensions=[]`: TorchServe 0.12's default is one list shared by every metrics cache
    # of the process, which its first user fills with its model name for good.
    def record(self, context, name: str, ms: float):
        """A time measured in ms, exported as the histogram `<name>_seconds` in seconds: TorchServe's
        histograms have the Prometheus client's fixed buckets (5 ms ... 10 s), which only fit times in the
        base unit."""
        seconds = round(ms / 1000, 6)
        context.metrics.add_time(
            f"{name}_seconds", seconds, None, "s", dimensions=[], metric_type=MetricTypes.HISTOGRAM
        )

    def count(self, context, name: str):
        """Add 1 to the custom counter `name`."""
        context.metrics.add_counter(name, 1, None, dimensions=[])
