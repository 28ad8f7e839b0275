"""Explanations, several files in one multipart request and the model card, against a real TorchServe
(and, where a server adds nothing, the handler alone)."""

import base64
import concurrent.futures
import hashlib
import io
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from bundle.settings import DIGITS_DIR
from deploy import versions
from model_src import backends
from model_src.explain import FIRST_STEPS, MIN_STEPS, StepBudget
from model_src.image_checks import InputError
from model_src.manifest import Manifest
from model_src.preprocessing import Preprocessing
from tests import images
from tests.conftest import batching_store, install_archive
from tests.test_handler import handle, make_handler

VAL = os.path.join(DIGITS_DIR, "val")
BACKENDS = ("torchscript", "onnx", "int8")  # beside 1.0, eager


def digit(label: str, i: int = 0) -> bytes:
    folder = os.path.join(VAL, label)
    with open(os.path.join(folder, sorted(os.listdir(folder))[i]), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint, archive_factory, torchserve_factory, digits):
    """my_model 1.0 (eager, batchSize 8 with a long window so requests share batches) and one version per
    other backend."""
    store = batching_store(tmp_path_factory.mktemp("explain"), checkpoint)
    ts = torchserve_factory(store)
    for backend in BACKENDS:
        versions.register(
            ts, install_archive(archive_factory(backend, backend), store, f"my_model_v{backend}.mar")
        )
    return ts


def call(ts, route, body, version=None, content_type="application/octet-stream", headers=None):
    path = f"/{route}/my_model" + (f"/{version}" if version else "")
    return ts.request(
        "POST", "inference", path, data=body, headers={"Content-Type": content_type, **(headers or {})}
    )


def ink_ratio(body: bytes, grid: list, prep: Preprocessing) -> float:
    """Mean |attribution| on ink pixels over the mean on blank paper, at the grid's resolution."""
    ink = np.asarray(prep.prepare(prep.decode(body)).resize((len(grid[0]), len(grid))), np.float32) < 128
    a = np.abs(np.asarray(grid))
    return a[ink].mean() / max(a[~ink].mean(), 1e-9)


# --- explanations --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.torchserve
@pytest.mark.parametrize("version", ["1.0", *BACKENDS])
def test_an_explanation_puts_its_mass_on_the_ink(server, checkpoint, version):
    prep = Preprocessing.from_dict(
        Manifest.from_checkpoint(torch.load(checkpoint, weights_only=True)).preprocessing
    )
    for label in ("0", "3", "7"):
        body = digit(label)
        predicted = next(iter(call(server, "predictions", body, version).json()))
        resp = call(server, "explanations", body, version)
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        assert answer["class"] == predicted and 0 < answer["probability"] <= 1
        grid = answer["attributions"]
        assert answer["shape"] == [len(grid), len(grid[0])] and max(answer["shape"]) <= 32
        assert max(abs(v) for row in grid for v in row) == pytest.approx(1.0)
        # Ink is about a third of a digit's pixels; the explanation says it is what matters.
        assert ink_ratio(body, grid, prep) > 3, (version, label)


@pytest.mark.slow
@pytest.mark.torchserve
def test_a_named_class_an_overlay_and_the_v2_route(server):
    body = digit("3")
    named = call(
        server,
        "explanations",
        json.dumps({"data": images.b64(body), "target": "8", "overlay": True}),
        content_type="application/json",
    ).json()
    assert named["class"] == "8" and named["probability"] < 0.5
    png = Image.open(io.BytesIO(base64.b64decode(named["overlay_png"])))
    assert png.format == "PNG" and min(png.size) >= 16
    by_header = call(server, "explanations", body, headers={"X-Explain-Target": "8"}).json()
    # (the same class, not the same numbers: each worker fits its own number of steps to the time left)
    assert by_header["class"] == "8" and by_header["shape"] == named["shape"]
    unknown = call(server, "explanations", body, headers={"X-Explain-Target": "eleven"})
    assert unknown.status_code == 400 and "unknown target class" in unknown.json()["message"]
    v2 = {"id": "7", "inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [images.b64(body)]}]}
    resp = server.request("POST", "inference", "/v2/models/my_model/explain", json=v2)
    assert resp.status_code == 200, resp.text
    (explained,) = [json.loads(d) for d in resp.json()["outputs"][0]["data"]]
    assert explained["class"] == "3" and explained["method"] == "integrated_gradients"


@pytest.mark.slow
@pytest.mark.torchserve
def test_bad_bodies_get_the_same_answer_from_explanations_as_from_predictions(server):
    for name, (body, status) in images.refused().items():
        ctype = "application/json" if body.startswith(b"{") else "application/octet-stream"
        predicted, explained = (
            call(server, r, body, content_type=ctype) for r in ("predictions", "explanations")
        )
        assert predicted.status_code == explained.status_code == status, name
        assert explained.json()["message"] == predicted.json()["message"], name
    many = json.dumps({"data": [images.b64(digit("3"))] * 5})  # over max_images_per_explanation (4)
    resp = call(server, "explanations", many, content_type="application/json")
    assert resp.status_code == 413 and "limit is 4" in resp.json()["message"]
    assert call(server, "predictions", many, content_type="application/json").status_code == 200


@pytest.mark.slow
@pytest.mark.torchserve
def test_a_batch_mixing_explanations_predictions_and_bad_input_answers_each_on_its_own(server):
    pid = server.request("GET", "management", "/models/my_model").json()[0]["workers"][0]["pid"]
    bad, bad_status = images.refused()[next(iter(images.refused()))]
    jobs = []  # (route, body, expected status, expected class)
    for label in "0123456789":
        jobs += [("predictions", digit(label, 1), 200, label), ("explanations", digit(label, 1), 200, label)]
    jobs += [("explanations", bad, bad_status, None), ("predictions", bad, bad_status, None)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: call(server, j[0], j[1]), jobs))
    for (route, _, status, label), resp in zip(jobs, answers):
        assert resp.status_code == status, (route, resp.text[:200])
        if status != 200:
            assert resp.json()["message"]
        elif route == "predictions":
            assert next(iter(resp.json())) == label
        else:
            assert resp.json()["class"] == label and "attributions" in resp.json()
    assert server.request("GET", "management", "/models/my_model").json()[0]["workers"][0]["pid"] == pid


# --- several files in one multipart request ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.torchserve
def test_three_files_in_one_multipart_request_get_three_answers_in_order(server):
    url, auth = server.url() + "/predictions/my_model", server.auth("inference")
    files = [
        ("a", ("three.png", digit("3"))),
        ("b", ("seven.png", digit("7"))),
        ("c", ("zero.png", digit("0"))),
    ]
    resp = requests.post(url, files=files, headers=auth, timeout=30)
    assert resp.status_code == 200, resp.text
    assert [next(iter(p)) for p in resp.json()] == ["3", "7", "0"]
    # A file that is not an image is refused by name, never dropped in silence.
    files = [("a", ("three.png", digit("3"))), ("notes", ("x.bin", bytes(range(256)) * 8))]
    resp = requests.post(url, files=files, headers=auth, timeout=30)
    assert resp.status_code == 415 and "'notes'" in resp.json()["message"]


# --- the model card ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.torchserve
@pytest.mark.parametrize("version", ["1.0", "onnx"])
def test_customized_describe_returns_the_model_card(server, trained, version):
    resp = server.request("GET", "management", f"/models/my_model/{version}?customized=true")
    assert resp.status_code == 200, resp.text
    card = resp.json()[0]["customizedMetadata"]
    with open(os.path.join(trained, "metrics.json")) as f:
        metrics = json.load(f)
    trained_as = Manifest.from_checkpoint(
        torch.load(os.path.join(trained, "checkpoint_best.pt"), weights_only=True)
    )
    assert card["model"] == "my_model" and card["version"] == version
    assert card["classes"] == [str(i) for i in range(10)]
    assert card["backend"] == ("eager" if version == "1.0" else "onnx")
    # TorchServe's frontend (Gson) drops null fields from customizedMetadata.
    assert card["preprocessing"] == {k: v for k, v in trained_as.preprocessing.items() if v is not None}
    assert card["training"]["best_val_acc"] == metrics["best_val_acc"]  # the checkpoint_best of the run
    assert card["training"]["data"] == DIGITS_DIR
    assert (
        card["training"]["command"].startswith("python -m train.train ")
        and " --epochs 3" in card["training"]["command"]
    )
    archive = card["archive"]
    mar = os.path.join(server.model_store, archive["file"])
    assert os.path.isfile(mar + ".sha256") and archive["built"] == card["built"]  # its SHA-256: the sidecar's
    served = backends.get(card["backend"]).file
    with zipfile.ZipFile(mar) as z:  # the digests of the files inside are those of the files inside
        assert archive["digests"][served] == hashlib.sha256(z.read(served)).hexdigest()
    assert card["explanations"]["model"] == (
        "the served file"
        if version == "1.0"
        else f"eager weights ({backends.reference().file}) shipped beside it"
    )


# --- the handler alone ---------------------------------------------------------------------------


def handle_kinds(handler, ctx, kinds_and_bodies):
    rows = [{"body": bytearray(body)} for _, body in kinds_and_bodies]
    return handle(handler, ctx, rows, [{"explain": str(kind == "explain")} for kind, _ in kinds_and_bodies])


def test_explanations_past_their_time_share_get_503_not_the_predictions_beside_them(
    archive_factory, digits, tmp_path
):
    handler, ctx = make_handler(archive_factory("1.0"), tmp_path, {"explain_time_share": 0})
    out, status = handle_kinds(handler, ctx, [("predict", digit("3")), ("explain", digit("3"))])
    assert status == [200, 503]
    assert next(iter(out[0])) == "3" and "retry" in out[1]["message"]


def test_an_onnx_archive_without_eager_weights_answers_501_naming_the_backend(
    archive_factory, digits, tmp_path
):
    unpacked = tmp_path / "unpacked"
    handler, ctx = make_handler(archive_factory("onnx", "onnx"), unpacked)
    handler._explainer = None
    os.remove(unpacked / backends.reference().file)
    out, status = handle_kinds(handler, ctx, [("explain", digit("3")), ("predict", digit("3"))])
    assert status == [501, 200]
    assert "onnx backend has no gradients" in out[0]["message"]
    shutil.rmtree(unpacked)


def test_an_explanation_past_the_memory_ceiling_is_507(archive_factory, digits, tmp_path, monkeypatch):
    # The worker's memory ceiling (memory_headroom_mb) turns an allocation past it into MemoryError: that
    # request fails with 507, not a 500 "internal error", and its neighbours answer.
    import handlers.image_classifier as handler_module

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    handler, ctx = make_handler(archive_factory("1.0"), tmp_path)
    monkeypatch.setattr(handler_module, "explain", out_of_memory)
    out, status = handle_kinds(handler, ctx, [("explain", digit("3")), ("predict", digit("3"))])
    assert status == [507, 200]
    assert out[0]["message"] == "this request needs more memory than a worker has"


# --- the step budget (model_src/explain.py): a fake clock and a fake explainer ------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_explainer(clock: Clock, step_seconds: float, taken: list):
    def explain_one(img, steps):
        taken.append(steps)
        clock.now += steps * step_seconds
        return {"image": img, "steps": steps}

    return explain_one


def test_the_step_budget_measures_then_shrinks_to_the_time_left_and_refuses_below_min_steps():
    clock, taken = Clock(), []
    budget = StepBudget(steps=32, clock=clock)
    explain_one = fake_explainer(clock, 0.25, taken)  # a step costs 0.25 s; the budget plans with 1.5 x that
    assert budget.explain_each(["a"], 1000.0, explain_one) == [{"image": "a", "steps": FIRST_STEPS}]
    assert budget.step_seconds == 0.25  # measured on the worker's first explanation
    # time for all it wants
    assert budget.explain_each(["b"], clock.now + 1000, explain_one)[0]["steps"] == 32
    with pytest.raises(InputError, match="time for explanations is spent") as e:
        # 3.75 s left holds 10 steps (at 0.375 s each); after them 1.25 s holds 3, under MIN_STEPS
        budget.explain_each(["c", "d"], clock.now + 3.75, explain_one)
    assert e.value.status == 503 and taken == [FIRST_STEPS, 32, 10] and 3 < MIN_STEPS


def test_no_time_left_is_503_before_any_step_and_a_small_setting_is_not_refused():
    clock, taken = Clock(), []
    with pytest.raises(InputError) as e:
        StepBudget(steps=32, clock=clock).explain_each(["a"], 0.0, fake_explainer(clock, 0.25, taken))
    assert e.value.status == 503 and taken == []  # explain_time_share 0: nothing runs
    small = StepBudget(steps=2, clock=clock)  # explain_steps under MIN_STEPS: it is what was asked for
    assert [r["steps"] for r in small.explain_each(["a", "b"], 10.0, fake_explainer(clock, 0.25, taken))] == [
        2,
        2,
    ]
