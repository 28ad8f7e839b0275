"""The limit: our handler called in-process on a real TorchServe Context, and the host's steal time that every
rate is corrected for (bench.bench measures each next to the served row it is the reference of)."""

import json
import os
import tempfile
import time
import zipfile

import torch
import yaml

from bundle import settings


def make_handler(archive: str, work: str, batch_size: int):
    """Unpack an archive and initialise our handler on it with a real TorchServe Context."""
    from ts.context import Context, RequestProcessor
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    from handlers.image_classifier import ImageClassifier

    model_dir = tempfile.mkdtemp(dir=work)
    with zipfile.ZipFile(archive) as z:
        z.extractall(model_dir)
    with open(os.path.join(model_dir, "MAR-INF", "MANIFEST.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(model_dir, manifest["model"]["configFile"])) as f:  # the name --config-file had
        yaml_cfg = yaml.safe_load(f)
    metrics = MetricsCacheYamlImpl(settings.METRICS_CONFIG)
    metrics.initialize_cache()
    ctx = Context(
        settings.MODEL_NAME,
        model_dir,
        manifest,
        batch_size,
        None,
        "0.12.0",
        metrics=metrics,
        model_yaml_config=yaml_cfg,
    )
    ctx.request_processor = None
    handler = ImageClassifier()
    handler.initialize(ctx)
    return handler, ctx, RequestProcessor


def per_second(fn, units: int, seconds: float) -> float:
    """units/s of fn() repeated for `seconds` after three warm-up calls."""
    for _ in range(3):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += units
    return n / (time.perf_counter() - t0)


def measure_limit(handler, ctx, request_processor, bodies, batch: int, seconds: float = 3.0) -> float:
    """Images per second through handler.handle() with `batch` requests (bodies as sent) per call, the bodies
    taken in turn (real photos differ in size: the first few alone are not the average)."""
    ctx.request_processor = [request_processor({}) for _ in range(batch)]
    ctx.metrics.request_ids = {i: str(i) for i in range(batch)}
    turn = iter(range(10**9))

    def call():
        start = next(turn) * batch
        handler.handle([{"body": bytearray(bodies[(start + i) % len(bodies)])} for i in range(batch)], ctx)

    return per_second(call, batch * images_in(bodies[0]), seconds)


def images_in(body: bytes) -> int:
    """Images in one request body: the length of a JSON body's "data" list, else 1 (raw image bytes)."""
    return len(json.loads(body)["data"]) if body[:1] == b"{" else 1


def measure_stages(handler, bodies, batch: int, seconds: float = 2.0) -> dict:
    """ms per image of decode + preprocess and of the model (at `batch`), in-process, as the handler runs
    them."""
    i = iter(range(10**9))
    decode = per_second(lambda: handler.decode_all([bodies[next(i) % len(bodies)]], handler.prep), 1, seconds)
    x = torch.stack(handler.decode_all([bodies[k % len(bodies)] for k in range(batch)], handler.prep))
    model = per_second(lambda: handler.predictor(x), batch, seconds)
    return {"decode": 1000 / decode, "model": 1000 / model}


def steal_seconds() -> float:
    """The machine's steal time so far (Linux; 0 elsewhere): CPU the hypervisor gave to other guests while
    this VM wanted it. On the reference VM it reached 45 % of the cores for minutes."""
    import psutil

    return getattr(psutil.cpu_times(), "steal", 0.0)


def unstolen(rate: float, steal_share: float) -> float:
    """A rate per core-second the host left us: every reference and row is compared in these units, so minutes
    when the host took a share of the cores do not read as a slow server (all three are CPU-bound)."""
    return rate / max(1e-3, 1 - steal_share)
