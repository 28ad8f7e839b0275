"""The published EfficientNet-Lite0 served as model `imagenet` beside my_model by a real TorchServe, the way
scripts/import_pretrained.sh does it: real photos (scikit-image, scikit-learn) over HTTP, in every form a
client may send them."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bundle import settings
from deploy import management, versions
from deploy.archive import archive_checkpoint
from deploy.client import post, top1
from deploy.import_pretrained import BATCH_SIZE, import_weights, write_photos
from model_src.manifest import Manifest
from model_src.net import load_model
from model_src.preprocessing import Preprocessing
from tests.conftest import install_archive
from tests.reference import torchvision_eval

pytestmark = [pytest.mark.slow, pytest.mark.torchserve]

CATS = {"tabby", "tiger cat", "Egyptian cat"}
EXPECTED = {"chelsea": CATS, "coffee": {"espresso", "cup"}, "rocket": {"missile", "projectile"}}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(str(tmp_path_factory.mktemp("photos")))


@pytest.fixture(scope="module")
def imagenet_server(photos, store, torchserve_factory, tmp_path_factory):
    """my_model 1.0 as in the other suites, then imagenet 1.0 registered beside it through the guard."""
    checkpoint = str(tmp_path_factory.mktemp("imagenet") / "checkpoint.pt")
    import_weights("efficientnet_lite0", checkpoint, photos)
    built = archive_checkpoint(
        checkpoint,
        "1.0",
        "onnx",
        model_name="imagenet",
        output=str(checkpoint + ".mar"),
        batch_size=BATCH_SIZE,
    )
    ts = torchserve_factory(store)
    versions.register(ts, install_archive(built["archive"], store, "imagenet.mar"), model="imagenet")
    return ts


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def forms(photo: Image.Image) -> dict[str, bytes]:
    """The same photo as a client may send it."""
    rotated = photo.transpose(Image.Transpose.ROTATE_90)  # stored turned, EXIF says "rotate back"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: show the stored pixels turned 90° clockwise (they are stored turned back)
    grey16 = np.asarray(photo.convert("L")).astype(np.uint16) * 257
    return {
        "jpeg": encode(photo, "JPEG", quality=92),
        "exif-rotated jpeg": encode(rotated, "JPEG", quality=92, exif=exif.tobytes()),
        "cmyk jpeg": encode(photo.convert("CMYK"), "JPEG", quality=92),
        "rgba png": encode(photo.convert("RGBA"), "PNG"),
        "webp": encode(photo, "WEBP", quality=90),
        "16-bit grey png": encode(Image.fromarray(grey16), "PNG"),
    }


def test_real_photos_get_their_imagenet_labels_in_every_form(imagenet_server, photos):
    assert {"imagenet", "my_model"} <= set(management.model_names(imagenet_server))
    for name, expected in EXPECTED.items():
        with Image.open(os.path.join(photos, "samples", f"{name}.jpg")) as img:
            photo = img.convert("RGB")
        answers = {}
        for form, body in forms(photo).items():
            resp = post(imagenet_server, body, "imagenet")
            assert resp.status_code == 200, (name, form, resp.text)
            answers[form] = resp.json()
        assert (
            len(answers["jpeg"]) == 5
            and list(answers["jpeg"].values()) == sorted(answers["jpeg"].values())[::-1]
        )
        # Every form keeps the photo's label; chelsea's three cat classes are nearly tied (0.38/0.37/0.16), so
        # a re-encoded copy may swap tiger cat and Egyptian cat: the class, not the exact key, is what must
        # hold.
        labels = {form: top1(a) for form, a in answers.items()}
        assert set(labels.values()) <= expected, (name, labels)


def test_the_digits_model_still_answers_beside_it(imagenet_server, png, checkpoint):
    resp = post(imagenet_server, png, settings.MODEL_NAME)
    assert resp.status_code == 200, resp.text
    # the digits model's own answer for this image (plain torch on torchvision's transform), not just any
    # digit
    model, ckpt = load_model(checkpoint)
    known = Manifest.from_checkpoint(ckpt)
    x = torchvision_eval(Preprocessing.from_dict(known.preprocessing), Image.open(io.BytesIO(png)))
    with torch.inference_mode():
        want = dict(zip(known.class_names, torch.softmax(model.eval()(x[None]), 1)[0].tolist()))
    got = resp.json()
    assert top1(got) == top1(want) and all(abs(p - want[label]) <= 1e-4 for label, p in got.items()), (
        got,
        want,
    )


def test_imagenet_takes_one_request_per_batch(imagenet_server):
    """A batch never holds a prediction hostage to an explanation (docs/frontdoor.md, the explanation
    lane)."""
    described = imagenet_server.request("GET", "management", "/models/imagenet").json()
    assert [v["batchSize"] for v in described] == [BATCH_SIZE] == [1]
