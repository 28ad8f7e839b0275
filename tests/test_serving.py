"""The serving path against a real TorchServe: batching with bad neighbours, every backend,
huge images and bombs, and the custom metrics on the Prometheus endpoint (histograms with buckets)."""

import concurrent.futures
import json
import os
import re
import time

import pytest
import requests
import torch

from bundle.settings import DIGITS_DIR
from deploy import management, versions
from model_src.manifest import Manifest
from model_src.net import load_model
from model_src.preprocessing import Preprocessing
from tests import images
from tests.conftest import batching_store, install_archive

pytestmark = [pytest.mark.slow, pytest.mark.torchserve]

VAL = os.path.join(DIGITS_DIR, "val")
PROMETHEUS_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


@pytest.fixture(scope="module")
def val_bodies(digits):
    files = [
        os.path.join(VAL, c, f)
        for c in sorted(os.listdir(VAL))
        for f in sorted(os.listdir(os.path.join(VAL, c)))
    ]
    return [open(p, "rb").read() for p in files[::24]]


@pytest.fixture(scope="module")
def offline(checkpoint, val_bodies):
    """Eager probabilities for each body, computed without TorchServe."""
    model, ckpt = load_model(checkpoint)
    known = Manifest.from_checkpoint(ckpt)
    prep = Preprocessing.from_dict(known.preprocessing)
    with torch.inference_mode():
        probs = torch.softmax(model(torch.stack([prep(prep.decode(b)) for b in val_bodies])), 1)
    return [{known.class_names[i]: p[i].item() for i in range(len(p))} for p in probs]


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint, torchserve_factory):
    """my_model 1.0 with batchSize 8 and a long batch window, so concurrent requests share batches."""
    return torchserve_factory(batching_store(tmp_path_factory.mktemp("serving"), checkpoint))


def post(ts, body, version=None, content_type="application/octet-stream", **kw):
    path = "/predictions/my_model" + (f"/{version}" if version else "")
    return ts.request("POST", "inference", path, data=body, headers={"Content-Type": content_type}, **kw)


def worker_pid(ts, version=""):
    return ts.request("GET", "management", f"/models/my_model/{version}".rstrip("/")).json()[0]["workers"][0][
        "pid"
    ]


def worker_pids(ts):
    return {w["pid"] for w in ts.request("GET", "management", "/models/my_model").json()[0]["workers"]}


def test_burst_of_good_and_bad_requests_in_shared_batches(server, val_bodies, offline):
    pid = worker_pid(server)
    log_path = os.path.join(server.log_dir, "ts_log.log")
    # The server is the module's: count only the batches of this burst, not those of tests before it.
    start = os.path.getsize(log_path)
    bad = [(body, status) for body, status in images.refused().values()]
    jobs = []  # (body, content type, expected status, expected label)
    for i, body in enumerate(val_bodies[:16]):
        jobs.append((body, "application/octet-stream", 200, max(offline[i], key=offline[i].get)))
        b, status = bad[i % len(bad)]
        jobs.append(
            (b, "application/json" if b.startswith(b"{") else "application/octet-stream", status, None)
        )
    # curl --data-binary's default
    jobs.append((val_bodies[0], "application/x-www-form-urlencoded", 400, None))
    # 32 images of 40 MP in one 0.5 MB request: each is under the per-image cap, together they would
    # keep the worker decoding past its timeout and fail the whole batch; the request's budget refuses it.
    heavy = json.dumps({"data": [images.b64(images.black_png(6300))] * 32}).encode()
    jobs.append((heavy, "application/json", 413, None))
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: post(server, j[0], content_type=j[1]), jobs))
    for (body, ctype, status, label), resp in zip(jobs, answers):
        assert resp.status_code == status, (ctype, body[:40], resp.text)
        if status == 200:
            assert next(iter(resp.json())) == label
        else:
            assert resp.json()["message"]
    assert worker_pid(server) == pid  # bad input never killed the worker
    # The frontend logs one "Looping backend response at: <ms>" per batch a worker answers (INFO;
    # serving/log4j2.xml keeps it): fewer batches than requests means requests really shared batches (with
    # their bad neighbours).
    with open(log_path, "rb") as f:
        f.seek(start)
        log = f.read().decode(errors="replace")
    batches = set(re.findall(r"W-\d+-\S+ \S+WorkerThread - Looping backend response at: \d+", log))
    assert 0 < len(batches) < len(jobs)


def test_input_forms_over_http(server, val_bodies, offline):
    body, want = val_bodies[3], max(offline[3], key=offline[3].get)
    b64 = images.b64(body)
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)) + "\n"
    url = server.url() + "/predictions/my_model"
    auth = server.auth("inference")
    answers = [
        requests.put(url, data=body, headers=auth, timeout=30),  # curl -T
        requests.post(url, files={"data": ("x.png", body, "image/png")}, headers=auth, timeout=30),  # curl -F
        requests.post(url, json={"data": b64}, headers=auth, timeout=30),
        requests.post(url, data=b64, headers={**auth, "Content-Type": "text/plain"}, timeout=30),
        requests.post(
            url, data=wrapped, headers={**auth, "Content-Type": "text/plain"}, timeout=30
        ),  # `base64 x.png`
        requests.post(url, data={"name": "cat"}, files={"upload": ("x.png", body)}, headers=auth, timeout=30),
    ]
    for resp in answers:
        assert resp.status_code == 200, resp.text
        assert next(iter(resp.json())) == want
    listed = requests.post(url, json={"data": [b64, b64]}, headers=auth, timeout=30)
    assert [next(iter(p)) for p in listed.json()] == [want, want]


def test_every_backend_served_matches_eager(server, archive_factory, val_bodies, offline):
    for backend in ("torchscript", "onnx", "int8"):
        path = install_archive(
            archive_factory(backend, backend), server.model_store, f"my_model_v{backend}.mar"
        )
        versions.register(server, path)
        for i, body in enumerate(val_bodies[:6]):
            resp = post(server, body, version=backend)
            assert resp.status_code == 200, resp.text
            got, want = resp.json(), offline[i]
            if backend == "int8":
                assert next(iter(got)) == max(want, key=want.get)
            else:
                assert all(abs(p - want[label]) <= 1e-4 for label, p in got.items()), (backend, got)
    assert management.default_version(server, "my_model") == "1.0"


def test_twelve_megapixel_jpeg_and_a_decompression_bomb(server, val_bodies):
    big = images.photo_jpeg()  # 4000 x 3000
    assert len(big) < 16 * 2**20  # under max_request_size
    resp = post(server, big)
    assert resp.status_code == 200 and len(resp.json()) == 5
    bomb = images.black_png(20000)  # 400 megapixels in ~390 KB
    resp = post(server, bomb)
    assert resp.status_code == 413 and "pixels" in resp.json()["message"]
    assert server.request("GET", "inference", "/ping").status_code == 200
    assert post(server, val_bodies[0]).status_code == 200


def test_hostile_bodies_fail_fast_beside_good_ones_in_shared_batches(server, val_bodies, offline):
    # Issue 17: the scan bomb alone kept a worker busy past its 30 s timeout, killing it and its batch.
    pids = worker_pids(server)
    tiny_items = json.dumps(["AA=="] * 1_900_000).encode()  # 15 MB, under max_request_size
    hostile = [
        (images.scan_bomb_jpeg(), "application/octet-stream", 413),
        (images.ico_wrapping_png(), "application/octet-stream", 415),
        (images.blank_rgba_webp(), "application/octet-stream", 413),
        (images.float_tiff(), "application/octet-stream", 413),
        (tiny_items, "application/json", 413),
        *[
            (body, "application/octet-stream", 413) for body in images.past_the_decode_budget().values()
        ],  # issue 25
    ]
    jobs = [(b, "application/octet-stream", 200) for b in val_bodies[: len(hostile)]]
    jobs = [job for pair in zip(jobs, hostile) for job in pair]  # good, hostile, good, hostile, ...
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: post(server, j[0], content_type=j[1]), jobs))
    for i, ((_, _, status), resp) in enumerate(zip(jobs, answers)):
        assert resp.status_code == status, (i, resp.text[:200])
        if status == 200:
            want = offline[i // 2]
            assert next(iter(resp.json())) == max(want, key=want.get)
        else:
            assert resp.json()["message"]
    assert worker_pids(server) == pids  # no worker died or timed out


def test_a_worker_past_its_memory_ceiling_answers_507_and_keeps_serving(
    tmp_path_factory, checkpoint, torchserve_factory, val_bodies
):
    # Issue 25: "a bomb fails one request, never the box". One worker whose data may grow 24 MB past its
    # loaded size; a 39.7 MP grey PNG (16 KB, under every pixel check) decodes into 40 MB.
    import yaml

    from bundle.settings import MODEL_CONFIG
    from deploy.archive import archive_checkpoint

    tmp = tmp_path_factory.mktemp("ceiling")
    cfg = yaml.safe_load(open(MODEL_CONFIG))
    cfg.update(minWorkers=1, maxWorkers=1)
    cfg["handler"]["memory_headroom_mb"] = 24
    (tmp / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp / "store").mkdir()
    archive = str(tmp / "store" / "my_model.mar")
    archive_checkpoint(checkpoint, "1.0", "eager", output=archive, config_file=str(tmp / "model-config.yaml"))
    ts = torchserve_factory(tmp / "store")
    pid = worker_pid(ts)
    resp = post(ts, images.black_png(6300))
    assert resp.status_code == 507 and "more memory than a worker has" in resp.json()["message"], resp.text
    assert [post(ts, body).status_code for body in val_bodies[:3]] == [200] * 3
    assert worker_pid(ts) == pid  # the same worker, alive
    with open(f"/proc/{pid}/limits") as f:
        ceiling = int(re.search(r"Max data size\s+(\d+)", f.read())[1])  # a number, not "unlimited"
    with open(f"/proc/{pid}/status") as f:
        status = dict(re.findall(r"^(Vm\w+):\s+(\d+) kB", f.read(), re.M))
    print(
        f"\nworker: ceiling {ceiling >> 20} MB, "
        + ", ".join(f"{k} {int(v) >> 10} MB" for k, v in status.items())
    )
    assert int(status["VmData"]) << 10 <= ceiling


def test_body_over_max_request_size_is_refused(server, val_bodies):
    resp = post(server, b"\0" * (17 * 2**20))
    assert resp.status_code == 413
    assert post(server, val_bodies[0]).status_code == 200


def metric_counts(ts) -> tuple[str, dict[str, float]]:
    """The metrics page and, per custom metric, its count: a histogram's _count, a counter's value (0 if
    absent)."""
    text = requests.get(ts.url("metrics") + "/metrics", timeout=30).text  # no token: the metrics API has none
    counts = {}
    for name in ("PreprocessTime_seconds", "InferenceTime_seconds", "HandlerTime_seconds", "RejectedInputs"):
        series = name + ("_count" if name.endswith("_seconds") else "")
        found = re.search(rf'^{series}\{{ModelName="my_model",[^}}]*\}} ([\d.E+-]+)$', text, re.M)
        counts[name] = float(found.group(1)) if found else 0.0
    return text, counts


def test_custom_metrics_on_the_prometheus_endpoint(server, val_bodies):
    # Deltas over this test's own two requests, not totals that earlier tests in the module already raised.
    # Sent one after the other, each is its own batch: preprocessing and handler times once per batch,
    # inference time only for the batch with an image, one rejection.
    _, before = metric_counts(server)
    assert post(server, val_bodies[0]).status_code == 200
    assert post(server, b"not an image").status_code == 415
    want = {
        "PreprocessTime_seconds": 2,
        "InferenceTime_seconds": 1,
        "HandlerTime_seconds": 2,
        "RejectedInputs": 1,
    }
    deadline = time.time() + 30  # the frontend files a worker's metrics from its log lines: wait for them
    while True:
        text, after = metric_counts(server)
        delta = {name: after[name] - before[name] for name in want}
        if all(delta[name] >= n for name, n in want.items()) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert delta == want, (before, after)
    labels = r'ModelName="my_model",Level="Model",Hostname="[^"]*"'
    for name in ("PreprocessTime_seconds", "InferenceTime_seconds", "HandlerTime_seconds"):
        assert f"# TYPE {name} histogram" in text, name
        buckets = re.findall(rf'^{name}_bucket\{{{labels},le="([^"]+)",?\}} ([\d.E+-]+)$', text, re.M)
        # TorchServe 0.12's fixed buckets: the Prometheus Java client's defaults, in seconds here
        assert [le for le, _ in buckets] == [*map(str, PROMETHEUS_DEFAULT_BUCKETS), "+Inf"], name
        counts = [float(c) for _, c in buckets]
        assert counts == sorted(counts) and counts[-1] == after[name], name  # cumulative; +Inf holds them all
    assert "# TYPE RejectedInputs counter" in text


def test_ready_after_start_means_the_first_request_succeeds(server, torchserve_factory, val_bodies, offline):
    # A server of its own, fresh: the module's has long been warm. start() returns once it says it is ready,
    # and the very first prediction must then be answered, by a READY worker, with the model's label.
    # (TorchServe queues a request while its worker loads, so the READY check comes first: an answer alone
    # would not show that start() waited.)
    fresh = torchserve_factory(server.model_store)
    try:
        workers = [w for v in management.models(fresh)["my_model"] for w in v["workers"]]
        assert workers and all(w["status"] == "READY" for w in workers), workers
        resp = post(fresh, val_bodies[1])
        assert resp.status_code == 200, resp.text[:300]
        assert next(iter(resp.json())) == max(offline[1], key=offline[1].get)
        ping = fresh.request("GET", "inference", "/ping")
        assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
    finally:
        fresh.stop()
