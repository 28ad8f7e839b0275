"""The shared preprocessing (model_src/preprocessing.py): decoding every format and colour mode,
refusals with their HTTP status, the tensor it produces, and bit-exact parity with training."""

import json
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from model_src.preprocessing import (
    ACCEPTED_NAMES,
    DEFAULT_MAX_PIXELS,
    MAX_JPEG_SCANS,
    InputError,
    Preprocessing,
    count_jpeg_scans,
    decode_image,
    pixel_cost,
    to_mode,
)
from tests import images
from tests.images import encode
from tests.reference import torchvision_eval
from train.data import CachedImages

GREY = Preprocessing(image_size=16, channels=1, mean=[0.5], std=[0.5])
RGB = Preprocessing(image_size=16, channels=3, mean=[0.5] * 3, std=[0.5] * 3)


def grey(values) -> np.ndarray:
    return np.asarray(to_mode(decode_image(values) if isinstance(values, bytes) else values, "L"))


# --- formats and modes ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(images.accepted()))
@pytest.mark.parametrize("prep", [GREY, RGB], ids=["grey", "rgb"])
def test_every_format_and_mode_decodes_to_the_model_input(name, prep):
    img = prep.decode(images.accepted()[name])
    x = prep(img)
    assert x.shape == (prep.channels, 16, 16) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0
    # the stroke is dark, the paper white: the centre must be darker than the corner, in every channel
    assert (x[:, 8, 8] < x[:, 0, 0] - 0.5).all()


def test_decoded_format_is_what_was_sent():
    formats = {n: decode_image(b).format for n, b in images.accepted().items()}
    assert {formats[n] for n in ("png-L", "jpeg-RGB", "gif-animated", "bmp", "webp", "tiff")} == {
        "PNG",
        "JPEG",
        "GIF",
        "BMP",
        "WEBP",
        "TIFF",
    }


def test_rgba_transparent_pixels_become_the_white_background():
    arr = np.zeros((2, 4, 4), np.uint8)
    arr[:, :2] = (200, 10, 10, 255)  # opaque red on the left
    arr[:, 2:] = (0, 0, 0, 0)  # fully transparent black on the right
    img = decode_image(encode(Image.fromarray(arr, "RGBA"), "PNG"))
    assert img.mode == "RGBA"
    rgb = np.asarray(to_mode(img, "RGB"))
    assert (rgb[:, 2:] == 255).all()  # paper, not black ink
    assert (rgb[:, :2] == (200, 10, 10)).all()  # opaque pixels untouched
    assert (grey(img)[:, 2:] == 255).all()
    assert (np.asarray(to_mode(img, "L", background=0))[:, 2:] == 0).all()  # the background is a setting


def test_semi_transparent_ink_is_blended_with_the_paper():
    img = Image.new("RGBA", (2, 2), (0, 0, 0, 128))  # half-transparent black
    assert abs(int(grey(img)[0, 0]) - 127) <= 1


def test_la_alpha_is_composited():
    arr = np.array([[[0, 0], [0, 255], [0, 128]]], np.uint8)  # black ink: transparent, opaque, half
    img = decode_image(encode(Image.fromarray(arr, "LA"), "PNG"))
    assert img.mode == "LA"
    assert grey(img).tolist()[0][:2] == [255, 0] and abs(int(grey(img)[0, 2]) - 127) <= 1


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_a_transparent_index(fmt):
    pal = Image.new("P", (4, 1), 0)
    pal.putpalette([0, 0, 0] * 2 + [255, 255, 255] + [0, 0, 0] * 253)  # 0: transparent black, 1: black, 2: white
    pal.putpixel((1, 0), 1)
    pal.putpixel((2, 0), 2)
    img = decode_image(encode(pal, fmt, transparency=0))
    assert img.mode == "P" and img.info.get("transparency") == 0
    assert grey(img).tolist() == [[255, 0, 255, 255]]  # PIL's own convert("L") would make index 0 black


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_trns_colour_key_is_transparent(mode):
    # PNG's tRNS chunk: one grey level or RGB colour means "transparent" in an image with no alpha.
    img = Image.fromarray(np.array([[0, 7, 200]], np.uint8)).convert(mode)
    key = 7 if mode == "L" else (7, 7, 7)
    img = decode_image(encode(img, "PNG", transparency=key))
    assert img.mode == mode and img.info.get("transparency") == key
    assert grey(img).tolist() == [[0, 255, 200]]  # the keyed pixel is paper; the others keep their value


def test_cmyk_jpeg():
    img = decode_image(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 255)), "JPEG"))
    assert img.mode == "CMYK"
    assert (np.asarray(to_mode(img, "RGB")) < 10).all()  # full black ink stays black
    img = decode_image(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"))
    assert (np.asarray(to_mode(img, "RGB")) > 245).all()


def test_one_bit_image():
    img = decode_image(encode(Image.fromarray(np.array([[0, 255, 0]], np.uint8)).convert("1"), "PNG"))
    assert img.mode == "1"
    assert grey(img).tolist() == [[0, 255, 0]]
    assert np.asarray(to_mode(img, "RGB")).tolist() == [[[0] * 3, [255] * 3, [0] * 3]]


def test_16_bit_png_is_scaled_not_clipped():
    data = encode(Image.fromarray(np.array([[0, 257, 32896, 65535]], np.uint16)), "PNG")
    img = decode_image(data)
    assert img.mode == "I;16"
    assert grey(img).tolist() == [[0, 1, 128, 255]]
    assert np.asarray(img.convert("L")).tolist()[0][2] == 255  # what PIL's own convert does (clips)
    x = GREY(img)
    assert x.shape == (1, 16, 16) and x.max() <= 1.0


def test_float_image():
    img = decode_image(encode(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)), "TIFF"))
    assert img.mode == "F"
    assert grey(img).tolist() == [[0, 128, 255]]


def test_grey_to_rgb_and_rgb_to_grey():
    x3 = RGB(Image.new("L", (5, 5), 255))
    assert x3.shape == (3, 16, 16) and torch.equal(x3, torch.ones(3, 16, 16))  # (1 - 0.5) / 0.5
    x1 = GREY(Image.new("RGB", (5, 5), (0, 0, 0)))
    assert torch.equal(x1, -torch.ones(1, 16, 16))


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.new("RGB", (40, 20), "white"), "JPEG", exif=exif)
    img = decode_image(data)
    assert img.size == (40, 20)  # stored as sent
    assert to_mode(img, "RGB").size == (20, 40)  # shown upright
    assert to_mode(img, "L").size == (20, 40)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_malformed_exif_keeps_the_stored_orientation(fmt):
    # The pixels decode; only the EXIF block is garbage. PIL's exif_transpose raises on it, which would
    # fail the request (and a training run); browsers show such an image as stored.
    arr = np.full((20, 40), 255, np.uint8)
    arr[:, :20] = 0
    data = encode(Image.fromarray(arr), fmt, exif=b"Exif\x00\x00not a tiff header")
    img = decode_image(data)
    assert to_mode(img, "L").size == (40, 20)
    assert grey(img)[:, :10].max() < 20 and grey(img)[:, 30:].min() > 235


def test_exif_orientation_reaches_the_tensor():
    arr = np.full((20, 40), 255, np.uint8)
    arr[:, :20] = 0  # left half black as stored; after orientation 6 (rotate 90 cw) it is the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    prep = Preprocessing(image_size=8, channels=1, mean=[0.0], std=[1.0])
    x = prep(prep.decode(encode(Image.fromarray(arr), "JPEG", exif=exif, quality=95)))
    assert x[0, :3].mean() < 0.1 and x[0, -3:].mean() > 0.9


# --- refusals -------------------------------------------------------------------------------------


def refusal(data, **kw) -> InputError:
    with pytest.raises(InputError) as e:
        decode_image(data, **kw)
    assert isinstance(e.value, ValueError) and str(e.value)
    return e.value


def test_random_bytes_are_415():
    data = np.random.RandomState(0).bytes(2000)
    assert refusal(data).status == 415
    assert refusal(b"hello, I am text").status == 415


def test_empty_bytes_are_refused():
    assert refusal(b"").status in (400, 415)


def test_truncated_png_is_400():
    png = encode(images.digit_like(64), "PNG")
    err = refusal(png[: len(png) // 2])
    assert err.status == 400 and "corrupt or truncated" in str(err)


@pytest.mark.parametrize("name", [n for n in images.refused() if "json" not in n])  # JSON: the handler's job
def test_shared_refusal_bodies_carry_their_status(name):
    body, status = images.refused()[name]
    assert refusal(body).status == status


def test_pixel_cap_is_413_and_checked_before_decoding(monkeypatch):
    data = encode(Image.new("L", (3000, 3000)), "PNG")

    def no_decoding(self):
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    err = refusal(data, max_pixels=1_000_000)
    assert err.status == 413 and "9,000,000" in str(err) and "1,000,000" in str(err)


def test_pixel_cap_can_be_lifted_for_trusted_data():
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    assert decode_image(data, max_pixels=None).size == (3000, 3000)


def test_12_megapixel_jpeg_decodes_through_draft():
    yy, xx = np.mgrid[0:3000, 0:4000]
    arr = np.stack([xx * 255 // 3999, yy * 255 // 2999, (xx + yy) * 255 // 6998], -1).astype(np.uint8)
    data = encode(Image.fromarray(arr), "JPEG", quality=85)
    prep = Preprocessing(image_size=64, resize_size=72, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    img = prep.decode(data)  # the default cap (40 MP) lets a 12 MP photo through
    assert 144 <= min(img.size) and img.size[0] < 4000  # decoded at a reduced scale, still >= 2x what is needed
    x = prep(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x[0, :, -1].mean() > x[0, :, 0].mean()  # red grows left to right


# --- the tensor -----------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_call_gives_c_h_w_float32(channels):
    prep = Preprocessing(image_size=12, channels=channels, mean=[0.2] * channels, std=[0.4] * channels)
    x = prep(Image.new("RGB", (30, 17), (255, 255, 255)))
    assert x.shape == (channels, 12, 12) and x.dtype == torch.float32 and x.is_contiguous()
    torch.testing.assert_close(x, torch.full_like(x, (1.0 - 0.2) / 0.4))


def test_resize_then_centre_crop():
    arr = np.zeros((20, 40), np.uint8)
    arr[:, 10:30] = 255  # white middle half, black left and right quarters
    img = Image.fromarray(arr)
    prep = Preprocessing(image_size=8, resize_size=10, channels=1, mean=[0.0], std=[1.0])
    prepared = prep.prepare(img)
    assert prepared.size == (8, 8)
    # 40x20 -> shorter side 10 -> 20x10 -> centre 8x8 keeps columns 6..13 of 20, inside the white middle
    assert np.asarray(prepared).min() > 200
    x = prep(img)
    assert x.shape == (1, 8, 8) and x.min() > 200 / 255
    squashed = Preprocessing(image_size=8, channels=1, mean=[0.0], std=[1.0])(img)  # no crop: the sides stay
    assert squashed.shape == (1, 8, 8) and squashed[0, :, 0].max() < 0.3


def test_settings_round_trip():
    prep = Preprocessing(image_size=24, resize_size=32, channels=3, mean=[0.1, 0.2, 0.3], std=[1, 2, 3], background=0)
    d = prep.to_dict()
    assert d["resize_size"] == 32 and d["mean"] == [0.1, 0.2, 0.3] and d["background"] == 0
    assert Preprocessing.from_dict(d) == prep
    assert Preprocessing.from_dict(json.loads(json.dumps(d))) == prep  # it travels in serving.json


# --- parity with training -------------------------------------------------------------------------


def test_parity_with_training_validation_on_digits(digits):
    prep = Preprocessing(image_size=16, channels=1, mean=[0.8], std=[0.3])
    ds = CachedImages(os.path.join(digits, "val"), prep, prep, cache=False)
    assert len(ds) == 359
    for i in range(0, len(ds), 7):
        path = ds.folder.samples[i][0]
        with open(path, "rb") as f:
            served = prep(prep.decode(f.read()))
        trained, label = ds[i]
        assert torch.equal(served, trained), path
        assert torch.equal(served, torchvision_eval(prep, Image.open(path))), path  # both sides call prep
        assert ds.classes[label] == os.path.basename(os.path.dirname(path))


@pytest.mark.parametrize("photo", ["china.jpg", "flower.jpg"])
def test_parity_with_training_validation_on_a_photo(tmp_path, photo):
    from sklearn.datasets import load_sample_image

    folder = tmp_path / "val" / "photo"
    folder.mkdir(parents=True)
    Image.fromarray(load_sample_image(photo)).save(folder / "0.jpg", quality=90)
    prep = Preprocessing(
        image_size=64, resize_size=72, channels=3, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]
    )
    ds = CachedImages(str(tmp_path / "val"), prep, prep, cache=False)
    decoded = prep.decode((folder / "0.jpg").read_bytes())  # (JPEG's DCT draft scaling is decode's choice)
    served = prep(decoded)
    assert served.shape == (3, 64, 64)
    assert torch.equal(served, ds[0][0])
    assert torch.equal(served, torchvision_eval(prep, decoded))  # both sides call prep: check it independently


# --- hostile inputs (issue 17): bounded by checks that run before Pillow decodes --------------------------


def test_only_the_six_formats_reach_pillow_and_only_their_plugin(monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **kw: opened.append(kw.get("formats")) or real_open(fp, *a, **kw))
    for body in images.other_formats().values():
        err = refusal(body)
        assert err.status == 415 and ACCEPTED_NAMES in str(err)
    assert opened == []
    for name in ("png-L", "jpeg-RGB", "gif-animated", "bmp", "tiff", "webp"):
        decode_image(images.accepted()[name])
    assert opened == [["PNG"], ["JPEG"], ["GIF"], ["BMP"], ["TIFF"], ["WEBP"]]


def test_jpeg_scans_are_counted_like_libjpeg():
    grey = images.digit_like(64)
    assert count_jpeg_scans(encode(grey, "JPEG")) == 1
    assert 2 <= count_jpeg_scans(encode(grey.convert("RGB"), "JPEG", progressive=True)) <= 12
    exif = Image.Exif()
    exif[0x010E] = "\xff\xda" * 50  # SOS markers inside a segment are data, not scans
    assert count_jpeg_scans(encode(grey, "JPEG", exif=exif)) == 1
    assert count_jpeg_scans(images.scan_bomb_jpeg(64, 6500)) == MAX_JPEG_SCANS + 1  # stops counting there


def test_scans_hidden_behind_a_fake_end_marker_still_count():
    # An FF D9 inside a comment segment is not the end: libjpeg skips segments by their length, so does the count.
    bomb = images.scan_bomb_jpeg(64, 500)
    first_sos = bomb.index(b"\xff\xda")
    comment = b"\xff\xfe" + struct.pack(">H", 6) + b"\xff\xd9\xff\xd9"
    assert count_jpeg_scans(bomb[:first_sos] + comment + bomb[first_sos:]) == MAX_JPEG_SCANS + 1


def test_scan_bomb_is_413_before_pillow_opens_it(monkeypatch):
    monkeypatch.setattr(Image, "open", lambda *a, **kw: pytest.fail("Pillow saw the scan bomb"))
    err = refusal(images.scan_bomb_jpeg())
    assert err.status == 413 and f"over {MAX_JPEG_SCANS} scans" in str(err)


def test_a_progressive_jpeg_with_normal_scans_decodes():
    data = encode(images.digit_like(64).convert("RGB"), "JPEG", progressive=True)
    assert decode_image(data).size == (64, 64)


def test_pillow_own_ceiling_is_our_limit_while_decoding(monkeypatch):
    seen = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: seen.append(Image.MAX_IMAGE_PIXELS) or real_load(self)
    )
    before = Image.MAX_IMAGE_PIXELS
    decode_image(encode(images.digit_like(), "PNG"), max_pixels=5000)
    assert seen == [5000] and Image.MAX_IMAGE_PIXELS == before  # set for the decode, then restored


@pytest.mark.parametrize(
    "mode, cost", [("L", 1), ("RGB", 1), ("P", 1), ("RGBA", 3), ("LA", 3), ("I;16", 2), ("CMYK", 2), ("F", 4)]
)
def test_pixel_cost_weighs_the_costly_modes(mode, cost):
    assert pixel_cost(Image.new(mode, (10, 20))) == 200 * cost


def test_transparent_palette_costs_like_rgba():
    img = Image.new("P", (10, 10))
    img.info["transparency"] = 0
    assert pixel_cost(img) == 300


@pytest.mark.parametrize("build", [images.blank_rgba_webp, images.float_tiff])
def test_costly_modes_within_the_pixel_cap_are_413_before_decoding(monkeypatch, build):
    data = build()
    from PIL import TiffImagePlugin, WebPImagePlugin

    for cls in (ImageFile.ImageFile, TiffImagePlugin.TiffImageFile, WebPImagePlugin.WebPImageFile):
        monkeypatch.setattr(cls, "load", lambda self: pytest.fail("pixels were decoded"))
    err = refusal(data)  # 6320 x 6320 = 39.9 MP: under the 40 MP cap by count
    assert err.status == 413 and "costs as much to decode as" in str(err)


def test_a_twelve_megapixel_transparent_png_is_within_the_cap():
    assert pixel_cost(Image.new("RGBA", (4000, 3000))) <= DEFAULT_MAX_PIXELS


def test_jpeg_compressed_tiff_is_415():
    err = refusal(encode(images.digit_like().convert("RGB"), "TIFF", compression="jpeg"))
    assert err.status == 415 and "TIFF compression" in str(err)


@pytest.mark.parametrize("compression", ["tiff_lzw", "tiff_adobe_deflate", "packbits", "raw"])
def test_common_tiff_compressions_decode(compression):
    assert decode_image(encode(images.digit_like(), "TIFF", compression=compression)).size == (32, 32)


def test_a_path_decodes_like_its_bytes(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(encode(images.digit_like(), "PNG"))
    assert np.array_equal(np.asarray(decode_image(str(path))), np.asarray(decode_image(path.read_bytes())))
