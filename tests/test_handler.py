"""The TorchServe handler without a server: a real ts.context.Context around an unpacked archive.

`handle()` below does what ts/service.py does around a handler call (fresh per-request state,
request ids for the metrics) and then serialises the answers the way the worker does, so what
passes here is what a worker would send back to the frontend.
"""

import io
import json
import logging
import os
import re
import struct
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.metrics.dimension import Dimension
from ts.metrics.metric_cache_abstract import MetricCacheAbstract
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.protocol.otf_message_handler import create_predict_response
from ts.utils.util import get_yaml_config

from bundle import settings
from bundle.settings import METRICS_CONFIG
from handlers.image_classifier import ImageClassifier
from model_src import backends, protocol
from model_src.image_checks import ACCEPTED_NAMES
from model_src.manifest import Manifest
from model_src.net import build_model, load_model
from model_src.preprocessing import Preprocessing
from tests import images
from tests.reference import assert_matches_reference, torchvision_eval
from train.data import CachedImages

BACKENDS = ["eager", "torchscript", "onnx", "int8"]
GOOD = 200
MODEL_CONFIG = get_yaml_config(settings.MODEL_CONFIG)  # the settings' one home
SETTINGS = MODEL_CONFIG["handler"]


# --- a handler in a real Context --------------------------------------------------------------


def unpack(archive, dest):
    """archive -> (model_dir, manifest, parsed model-config.yaml), as TorchServe unpacks and reads it."""
    with zipfile.ZipFile(archive) as z:
        z.extractall(dest)
    with open(os.path.join(dest, "MAR-INF", "MANIFEST.json")) as f:
        manifest = json.load(f)
    return str(dest), manifest, get_yaml_config(os.path.join(dest, manifest["model"]["configFile"]))


def make_handler(archive, dest, handler_cfg=None, batch_size=8):
    model_dir, manifest, cfg = unpack(archive, dest)
    cfg["handler"].update(handler_cfg or {})
    metrics = MetricsCacheYamlImpl(METRICS_CONFIG)
    metrics.initialize_cache()
    metrics.model_name = "my_model"  # as ts/model_service_worker.py does before loading
    ctx = Context(
        "my_model",
        model_dir,
        manifest,
        batch_size,
        None,
        "0.12.0",
        metrics=metrics,
        model_yaml_config=cfg,
    )
    handler = ImageClassifier()
    handler.initialize(ctx)
    assert handler.initialized
    return handler, ctx


def handle(handler, ctx, rows, headers=None):
    """One batch through handle(), wrapped like ts/service.py: -> (answers, per-request status codes).
    `headers`: each request's headers as TorchServe sets them (e.g. {"explain": "True"})."""
    req_ids = {i: f"req-{i}" for i in range(len(rows))}
    ctx.request_ids = ctx.metrics.request_ids = req_ids
    ctx.request_processor = [RequestProcessor(h) for h in headers or [{}] * len(rows)]
    out = handler.handle(rows, ctx)
    assert isinstance(out, list) and len(out) == len(rows)  # else TorchServe fails the whole batch (503)
    # The worker's own serialisation: it falls back to a 503 for the whole batch if an answer is not
    # JSON-able.
    frame = create_predict_response(out, req_ids, "Prediction success", 200, context=ctx)
    assert struct.unpack("!i", frame[:4])[0] == 200
    statuses = [ctx.get_response_status(i)[0] for i in range(len(rows))]
    assert all(ctx.get_response_content_type(i) == "application/json" for i in range(len(rows)))
    return out, statuses


@pytest.fixture(scope="module")
def handler_for(archive_factory, tmp_path_factory):
    """handler_for(backend, **handler_cfg) -> (handler, context), built once per module and settings."""
    made = {}

    def make(backend="eager", **cfg):
        key = (backend, tuple(sorted(cfg.items())))
        if key not in made:
            made[key] = make_handler(archive_factory("1.0", backend), tmp_path_factory.mktemp(backend), cfg)
        return made[key]

    return make


@pytest.fixture(scope="module")
def eager(handler_for):
    return handler_for("eager")


@pytest.fixture(scope="module")
def png():
    return images.accepted()["png-L"]


def val_files(digits, per_class=1):
    val = os.path.join(digits, "val")
    return [
        os.path.join(val, c, f)
        for c in sorted(os.listdir(val))
        for f in sorted(os.listdir(os.path.join(val, c)))[:per_class]
    ]


def is_prediction(answer, k=5):
    return (
        isinstance(answer, dict)
        and len(answer) == k
        and list(answer.values()) == sorted(answer.values(), reverse=True)
        and all(0 <= p <= 1 for p in answer.values())
    )


# --- backends ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_probs(checkpoint, digits):
    """{label: probability} per val file, from the checkpoint's model in plain torch on torchvision's
    transform: no handler, no archive, no Preprocessing, so the eager handler is compared with something other
    than itself."""
    model, ckpt = load_model(checkpoint)
    known = Manifest.from_checkpoint(ckpt)
    prep = Preprocessing.from_dict(known.preprocessing)
    with torch.inference_mode():
        x = torch.stack([torchvision_eval(prep, Image.open(p)) for p in val_files(digits)])
        probs = torch.softmax(model.eval()(x), dim=1)
    return [dict(zip(known.class_names, p.tolist())) for p in probs]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_initialises_and_agrees_with_the_model(backend, handler_for, digits, reference_probs):
    # topk above the number of classes: every probability comes back, so all of them are compared.
    handler, ctx = handler_for(backend, topk=100)
    assert handler.backend == backend and len(handler.labels) == 10
    rows = [{"body": bytearray(open(p, "rb").read())} for p in val_files(digits)]
    got, status = handle(handler, ctx, rows)
    # highest first, as answers
    want = [dict(sorted(w.items(), key=lambda kv: -kv[1])) for w in reference_probs]
    assert status == [GOOD] * len(rows)
    for g, w in zip(got, want):
        assert is_prediction(g, k=10) and g.keys() == w.keys()
        assert sum(g.values()) == pytest.approx(1, abs=1e-4)
        if backend == "int8":  # dynamic quantisation moves probabilities; the answer must not change
            assert next(iter(g)) == next(iter(w))
        else:
            assert max(abs(g[k] - w[k]) for k in w) <= 1e-4, (backend, g, w)


# --- input forms and image kinds ----------------------------------------------------------------


def test_every_input_form_in_one_batch(eager, png):
    b64 = images.b64(png)
    rows = [
        {"body": bytearray(png)},  # 0 raw body (curl -T, --data-binary with a binary type)
        {"data": bytearray(png)},  # 1 multipart field (curl -F data=@img.png)
        {"body": {"data": b64}},  # 2 JSON base64
        {"body": [b64, b64]},  # 3 JSON list -> a list of answers
        {"body": {"data": [b64]}},  # 4 JSON list under "data"
        {"body": b64},  # 5 base64 text (text/plain arrives as str)
        {"body": "data:image/png;base64," + b64},  # 6 data URL
        {  # 7 KServe v2
            "body": {
                "id": "42",
                "inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [b64]}],
            }
        },
        {
            "body": bytearray(json.dumps({"data": b64}).encode())
        },  # 8 JSON that arrived as bytes (charset= type)
        {"body": wrapped(b64)},  # 9 the output of `base64 img.png`: lines of 76 characters
        {"body": {"data": wrapped(b64)}},  # 10 ... inside JSON
        {"name": bytearray(b"cat"), "upload": bytearray(png)},  # 11 multipart: a text field, then the file
    ]
    out, status = handle(*eager, rows)
    assert status == [GOOD] * len(rows)
    single = out[0]
    assert is_prediction(single)
    assert all(out[i] == single for i in (1, 2, 5, 6, 8, 9, 10, 11))
    assert out[3] == [single, single]
    assert out[4] == [single]
    v2 = out[7]
    assert v2["id"] == "42" and v2["model_name"] == "my_model" and v2["model_version"] == "1.0"
    (output,) = v2["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [1]
    assert all(isinstance(d, str) for d in output["data"])  # JSON strings, as v2 BYTES tensors carry them
    assert [json.loads(d) for d in output["data"]] == [single]


def wrapped(b64: str) -> str:
    return "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)) + "\n"


def more_kinds() -> dict[str, bytes]:
    """Kinds beyond images.accepted(): transparency that must become white paper, not ink, and
    metadata that must not matter."""
    grey = images.digit_like()
    arr = np.zeros((32, 32, 4), np.uint8)  # transparent black paper ...
    arr[..., 3] = 255 - np.asarray(grey)  # ... with opaque black ink where the stroke is
    transparent_gif = grey.convert("P")
    keyed = np.where(np.asarray(grey) == 255, 7, np.asarray(grey)).astype(np.uint8)  # paper stored as 7 ...
    return {
        "png-RGBA-transparent-black": images.encode(Image.fromarray(arr, "RGBA"), "PNG"),
        "gif-transparent-index": images.encode(transparent_gif, "GIF", transparency=255),
        "png-L-trns-colour-key": images.encode(
            Image.fromarray(keyed), "PNG", transparency=7
        ),  # ... and keyed out
        "png-malformed-exif": images.encode(grey, "PNG", exif=b"not a tiff header"),
    }


LOSSY = {"jpeg-L", "jpeg-CMYK"}  # every other kind holds exactly the pixels of png-L
# ... when decoded at full scale: a 32-px JPEG decodes at 1/2 (the smallest DCT scale that covers digits' 16
# px), other pixels than png-L resized, the same label
DRAFTED = {"jpeg-RGB"}


@pytest.mark.parametrize("name", [*images.accepted(), *more_kinds()])
def test_every_image_kind_is_accepted(eager, png, name):
    data = {**images.accepted(), **more_kinds()}[name]
    out, status = handle(*eager, [{"body": bytearray(data)}, {"body": bytearray(png)}])
    assert status == [GOOD, GOOD], out
    assert is_prediction(out[0])
    if name in DRAFTED:
        assert next(iter(out[0])) == next(iter(out[1])), out  # the top-1 label
    elif name not in LOSSY:  # same pixels, same answer: no mode conversion changed the image
        assert out[0] == out[1]


def test_image_kinds_cover_the_brief():
    kinds = {Image.open(io.BytesIO(b)).format for b in images.accepted().values()}
    assert kinds == {"PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"}
    modes = {Image.open(io.BytesIO(b)).mode for b in images.accepted().values()}
    assert {"L", "RGB", "RGBA", "LA", "P", "CMYK", "1", "I;16"} <= modes
    gif = Image.open(io.BytesIO(images.accepted()["gif-animated"]))
    assert gif.n_frames == 2


# --- refusals ---------------------------------------------------------------------------------


def bad_rows(png) -> dict[str, tuple[dict, int]]:
    """name -> (TorchServe row, expected status)."""
    b64 = images.b64(png)
    raw = {name: ({"body": bytearray(body)}, status) for name, (body, status) in images.refused().items()}
    return {
        **raw,
        "empty-body": ({"body": bytearray()}, 400),
        "random-bytes": ({"body": bytearray(images.random_bytes())}, 415),
        "jpeg-header-then-garbage": ({"body": bytearray(images.jpeg_with_garbage())}, 400),
        "bad-base64-parsed-json": ({"body": {"data": "%%% not base64 %%%"}}, 400),
        "json-without-data": ({"body": {"image_url": "http://example.com/x.png"}}, 400),
        "json-number-in-data": ({"body": {"data": 42}}, 400),
        "json-bare-number": ({"body": 42}, 400),
        "json-empty-list": ({"body": {"data": []}}, 400),
        "malformed-json-bytes": ({"body": bytearray(b'{"data": "abc"')}, 400),
        "json-not-utf8": ({"body": bytearray(b'{"data": "\xff"}')}, 400),
        "json-nested-too-deep": ({"body": bytearray(b"[" * 100_000)}, 400),
        "over-max-image-pixels": (
            {"body": bytearray(images.png_declaring(8000, 6000))},
            413,
        ),  # 48 MP > 40 MP
        "too-many-images": ({"body": [b64] * (SETTINGS["max_images_per_request"] + 1)}, 413),
        "url-encoded-form": ({"some key": ""}, 400),  # what a PNG posted as a form turns into
        "v2-bad-base64": (
            {
                "body": {
                    "id": "9",
                    "inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [1], "data": ["@@"]}],
                }
            },
            400,
        ),
    }


def test_bad_requests_fail_alone_in_their_batch(eager, png, digits):
    bad = bad_rows(png)
    goods = [bytearray(open(p, "rb").read()) for p in val_files(digits)]
    rows, expected, names = [], [], []
    for i, (name, (row, status)) in enumerate(bad.items()):  # good, bad, good, bad, ...
        rows += [{"body": goods[i % len(goods)]}, row]
        expected += [GOOD, status]
        names += ["good", name]
    out, status = handle(*eager, rows)
    assert dict(zip(names[1::2], status[1::2])) == dict(zip(names[1::2], expected[1::2]))
    assert status == expected
    alone, _ = handle(*eager, [{"body": g} for g in goods])  # the good ones answer as they do without company
    for i, (answer, code) in enumerate(zip(out, status)):
        if code == GOOD:
            assert answer == alone[(i // 2) % len(goods)]
        else:
            assert answer["code"] == code and answer["type"] == "BadInput" and answer["message"], answer
            json.dumps(answer)
    messages = dict(zip(names[1::2], (a["message"] for a in out[1::2])))
    assert "no image in the request" in messages["url-encoded-form"]
    assert "no image in the request" in messages["empty-body"]
    assert "pixels" in messages["over-max-image-pixels"] and "pixels" in messages["bomb-header"]
    assert f"limit is {SETTINGS['max_images_per_request']}" in messages["too-many-images"]
    assert "base64" in messages["bad-base64-parsed-json"]
    assert '"data"' in messages["json-without-data"]
    assert (
        "does not parse" in messages["json-not-utf8"] and "does not parse" in messages["json-nested-too-deep"]
    )
    v2 = out[1 + 2 * list(bad).index("v2-bad-base64")]
    assert v2["id"] == "9" and v2["outputs"][0]["name"] == "error"  # v2 clients still get a v2 body


def test_a_batch_of_only_bad_requests(eager, png):
    bad = list(bad_rows(png).values())
    out, status = handle(*eager, [row for row, _ in bad])
    assert status == [s for _, s in bad]
    assert all(isinstance(a, dict) and a["message"] for a in out)


def test_limits_come_from_model_config(handler_for, png):
    handler, ctx = handler_for("eager", max_image_pixels=2 * 32 * 32, max_images_per_request=2)
    big = images.encode(images.digit_like(46), "PNG")  # 2,116 pixels
    small = images.encode(images.digit_like(33), "PNG")  # 1,089 pixels
    rows = [
        {"body": bytearray(png)},  # 32 x 32
        {"body": bytearray(big)},
        {"body": [images.b64(png)] * 2},  # 2 x 32 x 32: exactly at the cap
        {"body": [images.b64(png)] * 3},
        {"body": [images.b64(png), images.b64(small)]},  # each under the cap, together over it
    ]
    out, status = handle(handler, ctx, rows)
    assert status == [GOOD, 413, GOOD, 413, 413]
    assert "over the limit of 2,048" in out[1]["message"]
    assert "limit is 2" in out[3]["message"]
    assert "over 2,048 pixels together" in out[4]["message"]


def test_pixel_cap_is_per_request_not_per_image(handler_for, png):
    # 32 images each just under the cap would take minutes to decode (16-bit: 4 s each here) and
    # time the worker out, failing the requests batched with it; the cap is one budget per request.
    handler, ctx = handler_for("eager", max_image_pixels=40_000_000)
    near_cap = images.b64(images.black_png(6300))  # 39.7 MP each, 16 KB of PNG
    out, status = handle(
        handler, ctx, [{"body": bytearray(png)}, {"body": [near_cap] * 32}, {"body": bytearray(png)}]
    )
    assert status == [GOOD, 413, GOOD]
    assert "together" in out[1]["message"]


# --- hostile inputs (issue 17): each refused by a cheap check, its batch neighbours answered -----------


@pytest.fixture
def pillow_opens(monkeypatch):
    """The number of Image.open calls: a body refused before Pillow saw it adds none."""
    calls = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **kw: calls.append(1) or real_open(*a, **kw))
    return calls


def test_jpeg_scan_bomb_is_refused_before_pillow_and_neighbours_answer(eager, png, pillow_opens):
    # 6,500 empty scans over 6320 x 6320: libjpeg took 31-37 s, past the worker's 30 s timeout
    bomb = images.scan_bomb_jpeg()
    out, status = handle(
        *eager, [{"body": bytearray(png)}, {"body": bytearray(bomb)}, {"body": bytearray(png)}]
    )
    assert status == [GOOD, 413, GOOD]
    assert "over 100 scans" in out[1]["message"]
    assert out[0] == out[2] and is_prediction(out[0])
    assert len(pillow_opens) == 2  # the two good images only


@pytest.mark.parametrize("name", [*images.other_formats(), "ico-wrapping-13300-png"])
def test_unlisted_formats_are_415_naming_the_accepted_ones(eager, png, pillow_opens, name):
    body = images.ico_wrapping_png() if name.startswith("ico-wrapping") else images.other_formats()[name]
    out, status = handle(*eager, [{"body": bytearray(body)}, {"body": bytearray(png)}])
    assert status == [415, GOOD]
    assert ACCEPTED_NAMES in out[0]["message"]  # "PNG, JPEG, GIF, BMP, TIFF or WebP"
    assert len(pillow_opens) == 1  # the PNG: the refused body never reached Pillow (ICO's _open decodes)


def test_many_tiny_items_are_refused_before_any_base64_decoding(eager, png, monkeypatch):
    decodes = []
    real = protocol.b64decode
    monkeypatch.setattr(protocol, "b64decode", lambda text: decodes.append(1) or real(text))
    tiny = ["AA=="] * 2_400_000  # a 16 MiB JSON list: 2.4 M decodes took 3-4 s before the count check
    out, status = handle(*eager, [{"body": tiny}, {"body": bytearray(png)}])
    assert status == [413, GOOD]
    assert "2,400,000 images in one request" in out[0]["message"]
    assert decodes == []


def test_request_image_bytes_are_checked_before_decoding(handler_for, png, monkeypatch):
    handler, ctx = handler_for("eager", max_request_image_bytes=len(png) * 2 + 4)  # base64 padding rounds up
    decodes = []
    real = protocol.b64decode
    monkeypatch.setattr(protocol, "b64decode", lambda text: decodes.append(1) or real(text))
    b64 = images.b64(png)
    out, status = handle(handler, ctx, [{"body": [b64, b64]}, {"body": [b64, b64, b64]}, {"body": [b64, 7]}])
    assert status == [GOOD, 413, 400]
    assert (
        "over the limit of" in out[1]["message"] and "expected a base64 string, got int" in out[2]["message"]
    )
    assert len(decodes) == 2  # the first request's; the others were refused before decoding


@pytest.mark.parametrize("name", ["rgba-webp", "float-tiff"])
def test_costly_modes_count_more_pixels_and_are_refused_before_decoding(eager, png, monkeypatch, name):
    # 40 MP each, under the pixel cap, but compositing RGBA and scaling floats hold several 4- or 8-byte
    # copies: a 34-byte WebP took 1.3 s and +1 GB of worker memory, a 0.25 MB TIFF 1.4 s and +1.2 GB.
    from PIL import ImageFile, TiffImagePlugin, WebPImagePlugin

    body = images.blank_rgba_webp() if name == "rgba-webp" else images.float_tiff()
    for cls in (ImageFile.ImageFile, TiffImagePlugin.TiffImageFile, WebPImagePlugin.WebPImageFile):
        monkeypatch.setattr(cls, "load", lambda self: pytest.fail("pixels were decoded"))
    out, status = handle(*eager, [{"body": bytearray(body)}])
    assert status == [413]
    assert "6320x6320" in out[0]["message"] and "costs as much to decode as" in out[0]["message"]


def test_inputs_past_the_decode_budget_are_413_beside_good_neighbours(eager, png):
    # Issue 25, finding 8: each body is refused by its pre-scan before Pillow opens it; the error bodies name
    # our limits only (no Pillow internals, no exception class), for these and the other hostile bodies.
    hostile = {**images.past_the_decode_budget(), "png-text-bomb": images.png_with_text_bomb()}
    hostile.update({name: body for name, (body, _) in images.refused().items()})
    rows = [row for body in hostile.values() for row in ({"body": bytearray(body)}, {"body": bytearray(png)})]
    out, status = handle(*eager, rows)
    codes = dict(zip(hostile, status[::2]))
    assert all(codes[name] == 413 for name in images.past_the_decode_budget()), codes
    assert set(status[1::2]) == {GOOD} and all(answer == out[1] for answer in out[1::2])
    for name, answer in zip(hostile, out[::2]):
        assert not re.search(
            r"pillow|\bPIL\b|decompression ?bomb|178,?956,?970|MAX_\w+|\w+Error|traceback",
            answer["message"],
            re.I,
        ), (name, answer["message"])


def test_jpeg_compressed_tiff_is_415(eager, png):
    jpeg_tiff = images.encode(images.digit_like().convert("RGB"), "TIFF", compression="jpeg")
    out, status = handle(*eager, [{"body": bytearray(jpeg_tiff)}, {"body": bytearray(png)}])
    assert status == [415, GOOD]
    assert "TIFF compression jpeg is not accepted" in out[0]["message"]


def test_a_request_past_its_decoding_time_share_is_refused(handler_for, png):
    # A share so small that any decode uses it up: the first image of each request is decoded, the
    # next ones are refused. (The real share: 0.5 x 30 s / batch of 4 = 3.75 s per request.)
    handler, ctx = handler_for("eager", decode_time_share=1e-9)
    b64 = images.b64(png)
    out, status = handle(handler, ctx, [{"body": [b64]}, {"body": [b64, b64]}, {"body": bytearray(png)}])
    assert status == [GOOD, 413, GOOD]
    assert "share of the response timeout" in out[1]["message"]


def test_a_missing_setting_stops_the_worker_at_initialize():
    settings = {k: v for k, v in SETTINGS.items() if k != "topk"}
    with pytest.raises(RuntimeError, match="handler.topk"):
        ImageClassifier().configure({**MODEL_CONFIG, "handler": settings}, batch_size=1)
    without_timeout = {k: v for k, v in MODEL_CONFIG.items() if k != "responseTimeout"}
    with pytest.raises(RuntimeError, match="responseTimeout"):
        ImageClassifier().configure(without_timeout, batch_size=1)


def test_the_handler_sets_torch_threads_not_the_predictor(handler_for, archive_factory, tmp_path):
    before = torch.get_num_threads()
    try:
        handler_for("eager", threads=1)
        assert torch.get_num_threads() == 1  # initialize configures the worker process
        torch.set_num_threads(2)
        model_dir, manifest, _ = unpack(archive_factory("1.0", "onnx"), tmp_path)
        backends.load(os.path.join(model_dir, manifest["model"]["serializedFile"]), "onnx", "cpu", threads=1)
        assert torch.get_num_threads() == 2  # threads only sized ONNX Runtime's own pool
    finally:
        torch.set_num_threads(before)


# --- answers ----------------------------------------------------------------------------------


def test_topk_setting_reaches_the_answer(handler_for, png):
    (one,), _ = handle(*handler_for("eager", topk=1), [{"body": bytearray(png)}])
    (every,), _ = handle(*handler_for("eager", topk=100), [{"body": bytearray(png)}])
    assert is_prediction(every, k=10)  # 10 classes, asked for 100: all of them, highest first
    assert one == dict([next(iter(every.items()))])


# --- parity with training -----------------------------------------------------------------------


def test_handler_transform_is_the_training_transform(eager, checkpoint, digits):
    handler, _ = eager
    prep = Preprocessing.from_dict(
        Manifest.from_checkpoint(torch.load(checkpoint, weights_only=True)).preprocessing
    )
    assert handler.prep == prep  # the archive's bundle.json carries the checkpoint's preprocessing
    ds = CachedImages(os.path.join(digits, "val"), prep, prep, cache=False)  # the validation transform
    for i in range(0, len(ds), 45):
        path = ds.folder.samples[i][0]
        (x,) = handler.decode_all([open(path, "rb").read()], handler.prep)
        assert torch.equal(x, ds[i][0]), path
        # both sides share Preprocessing
        assert torch.equal(x, torchvision_eval(prep, Image.open(path))), path


PHOTO_PREP = Preprocessing(
    image_size=64, resize_size=72, channels=3, mean=[0.48, 0.45, 0.4], std=[0.23, 0.22, 0.22]
)


@pytest.fixture(scope="module")
def photo_handler(checkpoint, archive_factory, tmp_path_factory):
    """A handler initialised from an archive with 3-channel resize-and-crop preprocessing. The session's
    trained model is the 1-channel digits one, so this checkpoint holds a small untrained model in the same
    format: the transform, not the weights, is under test."""
    ckpt = torch.load(checkpoint, weights_only=True)
    known = Manifest.from_checkpoint(ckpt)
    model_args = {**known.model_args, "in_channels": 3, "num_classes": 2, "widths": [8], "blocks": [1]}
    torch.manual_seed(0)
    photo = Manifest(model_args, ["china", "flower"], PHOTO_PREP.to_dict(), known.provenance)
    ckpt.update(model=build_model(model_args).state_dict(), manifest=photo.to_dict())
    path = str(tmp_path_factory.mktemp("photo") / "checkpoint.pt")
    torch.save(ckpt, path)
    return make_handler(archive_factory("1.0", "eager", path), tmp_path_factory.mktemp("photo-handler"))


def test_photo_transform_is_the_training_transform(photo_handler, tmp_path):
    from sklearn.datasets import load_sample_image

    handler, ctx = photo_handler
    assert handler.prep == PHOTO_PREP  # initialize() read it from the archive's bundle.json
    prep = PHOTO_PREP
    china = Image.fromarray(load_sample_image("china.jpg"))  # 640 x 427 RGB
    flower = Image.fromarray(load_sample_image("flower.jpg"))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": both sides must apply it
    translucent = china.convert("RGBA")
    translucent.putalpha(128)
    files = {
        "china/china.jpg": images.encode(china, "JPEG", quality=90),
        "china/china_grey.jpg": images.encode(china.convert("L"), "JPEG", quality=90),
        "china/china_rotated.jpg": images.encode(china, "JPEG", quality=90, exif=exif),
        "flower/flower.jpg": images.encode(flower, "JPEG", quality=90),
        "flower/flower_translucent.png": images.encode(translucent.resize((160, 107)), "PNG"),
    }
    for name, data in files.items():
        (tmp_path / "val" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "val" / name).write_bytes(data)
    ds = CachedImages(str(tmp_path / "val"), prep, prep, cache=False)
    assert len(ds) == len(files)
    for i, (path, _) in enumerate(ds.folder.samples):
        data = open(path, "rb").read()
        (x,) = handler.decode_all([data], handler.prep)
        assert x.shape == (3, 64, 64)
        assert torch.equal(x, ds[i][0]), path
        # independent of Preprocessing: torchvision's transform, given the decoded image (JPEG's DCT draft
        # scaling is decode's choice); it applies EXIF and transparency itself
        assert_matches_reference(x, prep, prep.decode(data), path)
    out, status = handle(handler, ctx, [{"body": bytearray(files["china/china_rotated.jpg"])}])
    # the 3-channel model answers through handle()
    assert status == [GOOD] and set(out[0]) == {
        "china",
        "flower",
    }


# --- metrics ------------------------------------------------------------------------------------


def test_custom_metrics_are_recorded(eager, png, caplog):
    # A worker's metrics leave it as "[METRICS]..." log lines that the frontend parses; only metrics
    # declared in serving/metrics.yaml are exported, so the handler must not add any to the cache: an emission
    # whose type differs from the declaration would add one (and the frontend would file it under the declared
    # type), and the cached unit is the declared one whatever add_time() was given, so the value must be
    # seconds.
    handler, ctx = eager
    fresh = MetricsCacheYamlImpl(METRICS_CONFIG)  # what serving/metrics.yaml declares, before any request
    fresh.initialize_cache()
    declared = set(fresh.cache_keys())
    times = ("PreprocessTime_seconds", "InferenceTime_seconds", "HandlerTime_seconds")
    assert {f"histogram:{name}" for name in times} | {"counter:RejectedInputs"} <= declared
    with caplog.at_level(logging.INFO, logger="ts.metrics"):
        t0 = time.perf_counter()
        handle(handler, ctx, [{"body": bytearray(png)}, {"body": bytearray(b"nope")}, {"body": bytearray()}])
        wall = time.perf_counter() - t0
    # also after every earlier test's requests on this handler
    assert set(ctx.metrics.cache_keys()) == declared
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    assert not [r for r in caplog.records if "Failed to update metric" in r.getMessage()]

    def emitted(name):
        return [line for line in lines if line.startswith(f"[METRICS]{name}.")]

    for name in times:
        (line,) = emitted(name)
        assert line.startswith(f"[METRICS]{name}.Seconds:") and "#type:HISTOGRAM" in line
        assert 0 <= float(line.split(":", 1)[1].split("|")[0]) <= wall  # seconds, not ms
        assert "ModelName:my_model,Level:Model" in line
    rejected = emitted("RejectedInputs")
    assert len(rejected) == 2  # one per refused request
    assert all(
        line.startswith("[METRICS]RejectedInputs.Count:1|") and "#type:COUNTER" in line for line in rejected
    )


def test_metrics_carry_the_model_name_whatever_filled_torchserves_shared_default(
    eager, png, caplog, monkeypatch
):
    """TorchServe 0.12's add_time/add_counter default `dimensions=[]` is one list for the whole process,
    and its first user appends its own model name to it for good (a random test order made that a cache
    without one). The handler passes its own list: its metrics name its model whatever the default holds."""
    for method in (MetricCacheAbstract.add_time, MetricCacheAbstract.add_counter):
        polluted = tuple([Dimension("ModelName", "another")] if d == [] else d for d in method.__defaults__)
        monkeypatch.setattr(method, "__defaults__", polluted)
    handler, ctx = eager
    with caplog.at_level(logging.INFO, logger="ts.metrics"):
        handle(handler, ctx, [{"body": bytearray(png)}, {"body": bytearray(b"nope")}])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    assert lines and all("ModelName:my_model," in line for line in lines), lines


def test_no_inference_metric_when_nothing_reaches_the_model(eager, caplog):
    handler, ctx = eager
    with caplog.at_level(logging.INFO, logger="ts.metrics"):
        out, status = handle(handler, ctx, [{"body": bytearray(b"nope")}])
    assert status == [415]
    lines = [r.getMessage() for r in caplog.records]
    assert not any(line.startswith("[METRICS]InferenceTime_seconds.") for line in lines)
    assert any(line.startswith("[METRICS]HandlerTime_seconds.") for line in lines)
