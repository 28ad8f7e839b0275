"""The shared preprocessing: decoding, colour modes, refusals, and parity with training."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from model_src.preprocessing import InputError, Preprocessing, decode_image, to_mode
from tests import images
from train.data import CachedImages

GREY = Preprocessing(image_size=16, channels=1, mean=[0.5], std=[0.5])


@pytest.mark.parametrize("name", list(images.accepted()))
def test_every_format_and_mode_decodes_to_the_model_input(name):
    data = images.accepted()[name]
    x = GREY(GREY.decode(data))
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    # the stroke is dark, the paper white: the centre column must be darker than the corner
    assert x[0, 8, 8] < x[0, 0, 0]


def test_transparent_pixels_become_white_paper():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    assert np.asarray(to_mode(img, "L")).min() == 255


def test_16_bit_is_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = np.asarray(to_mode(img, "L"))
    assert out.tolist() == [[0, 128, 255]]


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    data = images.encode(Image.new("RGB", (40, 20), "white"), "JPEG", exif=exif)
    assert to_mode(decode_image(data), "RGB").size == (20, 40)


@pytest.mark.parametrize("name", [n for n in images.refused() if "json" not in n])  # JSON: the handler's job
def test_refusals_carry_an_http_status(name):
    body, status = images.refused()[name]
    with pytest.raises(InputError) as e:
        decode_image(body)
    assert e.value.status == status


def test_pixel_cap_is_checked_before_decoding():
    data = images.encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(InputError) as e:
        decode_image(data, max_pixels=1_000_000)
    assert e.value.status == 413 and "9,000,000" in str(e.value)


def test_empty_body_is_refused():
    with pytest.raises(InputError):
        decode_image(b"")


def test_12_megapixel_jpeg_decodes_through_draft():
    yy, xx = np.mgrid[0:3000, 0:4000]
    arr = np.stack([(xx / 16) % 256, (yy / 12) % 256, (xx + yy) / 28 % 256], -1).astype(np.uint8)
    data = images.encode(Image.fromarray(arr), "JPEG", quality=85)
    prep = Preprocessing(image_size=64, resize_size=72, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    img = prep.decode(data)
    assert img.size[0] < 4000  # decoded at a reduced scale
    assert prep(img).shape == (3, 64, 64)


def test_resize_then_centre_crop():
    prep = Preprocessing(image_size=8, resize_size=10, channels=3, mean=[0.0] * 3, std=[1.0] * 3)
    assert prep.prepare(Image.new("RGB", (40, 20))).size == (8, 8)
    assert prep(Image.new("RGB", (40, 20))).shape == (3, 8, 8)


def test_settings_round_trip():
    prep = Preprocessing(image_size=24, resize_size=32, channels=3, mean=[0.1, 0.2, 0.3], std=[1, 2, 3])
    assert Preprocessing.from_dict(prep.to_dict()) == prep


def test_parity_with_training_validation_on_digits(digits):
    ds = CachedImages(os.path.join(digits, "val"), GREY, GREY, cache=False)
    for i in (0, 57, 358):
        path = ds.folder.samples[i][0]
        served = GREY(GREY.decode(open(path, "rb").read(), max_pixels=40_000_000))
        assert torch.equal(served, ds[i][0])


def test_parity_with_training_validation_on_a_photo(tmp_path):
    from sklearn.datasets import load_sample_image

    folder = tmp_path / "val" / "china"
    folder.mkdir(parents=True)
    Image.fromarray(load_sample_image("china.jpg")).save(folder / "0.jpg", quality=90)
    prep = Preprocessing(
        image_size=64, resize_size=72, channels=3, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]
    )
    ds = CachedImages(str(tmp_path / "val"), prep, prep, cache=False)
    served = prep(prep.decode(io.BytesIO((folder / "0.jpg").read_bytes()).getvalue()))
    assert torch.equal(served, ds[0][0])
