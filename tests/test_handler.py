"""The TorchServe handler without a server: a real ts.context.Context around an unpacked archive."""

import json
import os
import zipfile

import pytest
import torch
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers.image_classifier import ImageClassifier, top_k
from model_src.runtime import BACKEND_FILES
from tests import images
from tests.conftest import ROOT
from train.data import CachedImages


def make_handler(archive, tmp_path, handler_cfg=None, batch_size=8):
    model_dir = tmp_path / "model"
    with zipfile.ZipFile(archive) as z:
        z.extractall(model_dir)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    cfg = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
    cfg["handler"].update(handler_cfg or {})
    metrics = MetricsCacheYamlImpl(os.path.join(ROOT, "serving", "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "my_model"  # as ts/model_loader.py does
    ctx = Context(
        "my_model", str(model_dir), manifest, batch_size, None, "0.12.0", metrics=metrics, model_yaml_config=cfg
    )
    handler = ImageClassifier()
    handler.initialize(ctx)
    return handler, ctx


def handle(handler, ctx, rows):
    """What ts/service.py does around handle(): fresh per-request state for the batch."""
    ctx.request_processor = [RequestProcessor({}) for _ in rows]
    ctx.request_ids = ctx.metrics.request_ids = {i: f"req-{i}" for i in range(len(rows))}
    out = handler.handle(rows, ctx)
    assert isinstance(out, list) and len(out) == len(rows)
    return out, [ctx.get_response_status(i)[0] or 200 for i in range(len(rows))]


@pytest.fixture(scope="module")
def eager(archive_factory, tmp_path_factory):
    return make_handler(archive_factory("1.0"), tmp_path_factory.mktemp("h"))


@pytest.fixture(scope="module")
def png():
    return images.accepted()["png-L"]


@pytest.mark.parametrize("backend", ["torchscript", "onnx", "int8"])
def test_every_backend_agrees_with_eager(backend, eager, archive_factory, tmp_path, digits):
    handler, ctx = make_handler(archive_factory("1.0", backend), tmp_path)
    assert handler.backend == backend
    val = os.path.join(digits, "val")
    rows = [
        {"body": bytearray(open(os.path.join(val, c, sorted(os.listdir(os.path.join(val, c)))[0]), "rb").read())}
        for c in sorted(os.listdir(val))
    ]
    got, _ = handle(handler, ctx, rows)
    want, _ = handle(*eager, rows)
    for g, w in zip(got, want):
        if backend == "int8":
            assert next(iter(g)) == next(iter(w))
        else:
            assert g.keys() == w.keys() and all(abs(g[k] - w[k]) <= 1e-4 for k in w)


def test_every_input_form_in_one_batch(eager, png):
    b64 = images.b64(png)
    rows = [
        {"body": bytearray(png)},  # raw body
        {"data": bytearray(png)},  # multipart field
        {"file": bytearray(png)},  # multipart under another name
        {"body": {"data": b64}},  # JSON base64
        {"body": [b64, b64]},  # JSON list
        {"body": {"data": [b64]}},  # JSON list under data
        {"body": b64},  # base64 text
        {"body": "data:image/png;base64," + b64},  # data URL
        {"body": {"id": "7", "inputs": [{"name": "in", "shape": [1], "datatype": "BYTES", "data": [b64]}]}},
    ]
    out, status = handle(*eager, rows)
    assert status == [200] * len(rows)
    single = out[0]
    assert isinstance(single, dict) and len(single) == 5
    assert all(out[i] == single for i in (1, 2, 3, 6, 7))
    assert out[4] == [single, single] and out[5] == [single]
    v2 = out[8]
    assert v2["id"] == "7" and v2["outputs"][0]["shape"] == [1]
    assert json.loads(v2["outputs"][0]["data"][0]) == single


@pytest.mark.parametrize("name", list(images.accepted()))
def test_every_image_kind_is_accepted(eager, name):
    out, status = handle(*eager, [{"body": bytearray(images.accepted()[name])}])
    assert status == [200], out
    assert len(out[0]) == 5


def test_bad_requests_fail_alone_in_their_batch(eager, png):
    bad = {name: {"body": bytearray(body)} for name, (body, _) in images.refused().items()}
    bad["empty"] = {"body": bytearray()}
    bad["number-in-json"] = {"body": {"data": 42}}
    bad["bare-json-number"] = {"body": 42}
    bad["empty-json-object"] = {"body": {}}
    bad["form-encoded"] = {"hello world": ""}
    bad["v2-bad-base64"] = {
        "body": {"id": "1", "inputs": [{"name": "i", "datatype": "BYTES", "shape": [1], "data": ["@@@"]}]}
    }
    rows, expected = [], []
    for name, row in bad.items():
        rows += [{"body": bytearray(png)}, row]
        expected += [200, images.refused().get(name, (None, 400))[1]]
    out, status = handle(*eager, rows)
    assert status == expected, dict(zip([n for name in bad for n in ("good", name)], status))
    for answer, code in zip(out, status):
        if code == 200:
            assert len(answer) == 5
        else:
            assert answer["code"] == code and answer["message"]
    assert "no image in the request" in out[rows.index(bad["form-encoded"])]["message"]
    assert out[rows.index(bad["v2-bad-base64"])]["outputs"][0]["name"] == "error"


def test_limits_from_model_config(archive_factory, tmp_path, png):
    handler, ctx = make_handler(
        archive_factory("1.0"), tmp_path, {"max_image_pixels": 100, "max_images_per_request": 2}
    )
    out, status = handle(handler, ctx, [{"body": bytearray(png)}, {"body": [images.b64(png)] * 3}])
    assert status == [413, 413]
    assert "over the limit of 100" in out[0]["message"] and "limit is 2" in out[1]["message"]


def test_top_k_never_asks_for_more_classes_than_exist():
    probs = torch.tensor([0.2, 0.5, 0.3])
    assert list(top_k(probs, ["a", "b", "c"], 5)) == ["b", "c", "a"]
    assert top_k(probs, ["a", "b", "c"], 1) == {"b": 0.5}


def test_handler_transform_is_the_training_transform(eager, digits):
    handler, _ = eager
    ds = CachedImages(os.path.join(digits, "val"), handler.prep, handler.prep, cache=False)
    for i in (3, 100, 200):
        assert torch.equal(handler.to_tensor(open(ds.folder.samples[i][0], "rb").read()), ds[i][0])


def test_custom_metrics_are_emitted(eager, png, caplog):
    # Metrics leave a worker as [METRICS] log lines, which the frontend parses and exports.
    handler, ctx = eager
    with caplog.at_level("INFO", logger="ts.metrics.caching_metric"):
        handle(handler, ctx, [{"body": bytearray(png)}, {"body": bytearray(b"nope")}])
    text = caplog.text
    for line in (
        "PreprocessTime.Milliseconds:",
        "InferenceTime.Milliseconds:",
        "HandlerTime.Milliseconds:",
        "RejectedInputs.Count:1",
    ):
        assert f"[METRICS]{line}" in text, line
    assert "ModelName:my_model,Level:Model" in text


def test_backend_is_read_from_the_serialized_file_name():
    assert set(BACKEND_FILES) == {"eager", "torchscript", "onnx", "int8"}
