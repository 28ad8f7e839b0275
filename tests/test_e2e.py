"""End to end against a real TorchServe: archive, start, predict, register, promote, stop."""

import concurrent.futures
import io
import json
import os
import subprocess

import pytest
import torch
from PIL import Image

from bundle.settings import DIGITS_DIR
from deploy import management, versions
from model_src import backends
from model_src.manifest import Manifest
from model_src.preprocessing import Preprocessing
from tests.conftest import install_archive, served_version

# The last test promotes an ONNX 2.0; the tests above compare answers with the eager model: they run first.
pytestmark = [pytest.mark.slow, pytest.mark.torchserve, pytest.mark.in_order]

VAL = os.path.join(DIGITS_DIR, "val")


def val_images():
    return sorted(
        (os.path.join(VAL, c, f), c) for c in os.listdir(VAL) for f in os.listdir(os.path.join(VAL, c))
    )


def offline_label(checkpoint, data: bytes) -> str:
    predictor = backends.load(checkpoint, "eager")
    known = Manifest.from_checkpoint(torch.load(checkpoint, weights_only=True))
    prep = Preprocessing.from_dict(known.preprocessing)
    logits = predictor(prep(prep.decode(data)).unsqueeze(0))
    return known.class_names[logits.argmax(1).item()]


def post(ts, data, version=None, **kw):
    path = "/predictions/my_model" + (f"/{version}" if version else "")
    return ts.request("POST", "inference", path, data=data, **kw)


def test_png_and_jpeg_match_the_offline_model(server, checkpoint, digits):
    path, truth = val_images()[5]
    png = open(path, "rb").read()
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").resize((64, 64)).save(buf, "JPEG", quality=95)
    for data in (png, buf.getvalue()):
        resp = post(server, data, headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert next(iter(body)) == offline_label(checkpoint, data)
        assert list(body.values()) == sorted(body.values(), reverse=True)  # highest first
        assert len(body) == 5


def test_every_val_image_over_http_matches_offline_accuracy(server, checkpoint, digits):
    from train.evaluate import evaluate

    images = val_images()

    def label(item):
        resp = post(server, open(item[0], "rb").read())
        assert resp.status_code == 200, resp.text
        return next(iter(resp.json()))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        served = list(pool.map(label, images))
    served_acc = sum(p == t for p, (_, t) in zip(served, images)) / len(images)
    assert len(images) == 359
    assert served_acc == pytest.approx(evaluate(checkpoint)["accuracy"], abs=1e-9)


def test_non_image_body_is_a_4xx_with_message_and_the_server_keeps_serving(server):
    resp = post(server, b"this is not an image", headers={"Content-Type": "application/octet-stream"})
    assert 400 <= resp.status_code < 500
    assert "image" in resp.json()["message"]
    good = post(server, open(val_images()[0][0], "rb").read())
    assert good.status_code == 200


def test_predict_script_uses_the_token(server):
    image = val_images()[40][0]
    env = {**os.environ, "TS_INFERENCE_URL": server.url("inference"), "TS_KEY_FILE": server.key_file}
    out = subprocess.run(["scripts/predict.sh", image], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert len(body) == 5 and all(0 <= p <= 1 for p in body.values())
    # from another directory, with the image path relative to it (predict.sh moves to the repo root)
    folder, name = os.path.split(os.path.abspath(image))
    script = os.path.relpath("scripts/predict.sh", folder)
    out = subprocess.run(
        [script, name, "1.0"], cwd=folder, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    again = json.loads(out.stdout)
    assert len(again) == 5 and next(iter(again)) == next(iter(body))  # the same top label through /1.0


def test_register_second_version_promote_and_call_both(server, store, archive_factory):
    install_archive(archive_factory("2.0", backend="onnx"), store, "my_model_v2.0.mar")
    assert versions.register(server, os.path.join(store, "my_model_v2.0.mar")) == ("my_model", "2.0")
    assert management.default_version(server, "my_model") == "1.0"  # registering never changes the default
    versions.set_default(server, "my_model", "2.0", reason="test")
    assert management.default_version(server, "my_model") == "2.0"
    data = open(val_images()[100][0], "rb").read()
    answers = [post(server, data, v) for v in ("1.0", "2.0", None)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    labels = [next(iter(a.json())) for a in answers]
    assert labels[0] == labels[1] == labels[2]  # same weights, eager vs ONNX
    # so the label cannot tell who answered: the answer's own model_version does
    assert [served_version(server, data, v) for v in ("1.0", "2.0", None)] == ["1.0", "2.0", "2.0"]
    listed = {v["modelVersion"] for v in management.versions(server, "my_model")}
    assert listed == {"1.0", "2.0"}
