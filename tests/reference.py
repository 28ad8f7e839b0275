"""An independent reference for the parity tests: torchvision's own eval transforms, set from a
Preprocessing's numbers. Training and serving both call model_src.preprocessing, so comparing them with each
other cannot show a bug in it; comparing each with this can."""

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F


def torchvision_eval(prep, img: Image.Image) -> torch.Tensor:
    """A decoded image -> the tensor torchvision's eval preset makes of it with `prep`'s size, mean and std:
    EXIF turn, transparency onto the background colour, resize (the shorter side then a centre crop, or
    straight to the square), to_tensor, normalize."""
    img = ImageOps.exif_transpose(img)
    mode = "L" if prep.channels == 1 else "RGB"
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255.0
        flat = rgba[..., :3] * alpha + prep.background * (1 - alpha)
        img = Image.fromarray(np.rint(flat).astype(np.uint8), "RGB")
    img = img.convert(mode)
    if prep.resize_size is None:
        img = F.resize(img, [prep.image_size, prep.image_size], InterpolationMode.BILINEAR)
    # the shorter side to resize_size, the longer one rounded (torchvision's own Resize(int) truncates it)
    else:
        scale = prep.resize_size / min(img.size)
        size = [max(1, round(img.height * scale)), max(1, round(img.width * scale))]
        img = F.center_crop(F.resize(img, size, InterpolationMode.BILINEAR), prep.image_size)
    return F.normalize(F.to_tensor(img), prep.mean, prep.std)


def assert_matches_reference(x: torch.Tensor, prep, img: Image.Image, what: str = ""):
    """`x` is torchvision_eval's tensor of `img`: exactly when the image is resized straight to the square;
    with a resize and a centre crop, `prepare` resamples only the crop's box in one pass
    (preprocessing.resize_crop), where Pillow's float arithmetic rounds a few taps apart from
    resize-then-crop: there at most one grey level apart, and exactly equal on most values (84-97 % on the
    photos of the tests; a crop one pixel off differs on most)."""
    want = torchvision_eval(prep, img)
    if prep.resize_size is None:
        assert torch.equal(x, want), what
        return
    assert_within_one_grey(x, want, prep, what)


def assert_within_one_grey(x: torch.Tensor, want: torch.Tensor, prep, what: str = "", atol: float = 0.0):
    """`x` and `want` (normalised inputs) are at most one grey level apart and equal (within `atol`, for a
    float formula beside the table look-up) on most values: what resampling only the crop's box allows, and
    what a crop one pixel off does not."""
    diff = (x - want).abs()
    grey = 1 / 255 / min(prep.std)  # one grey level, normalised
    assert x.shape == want.shape and float(diff.max()) <= grey * 1.001 + atol, (what, float(diff.max()), grey)
    assert float((diff <= atol).float().mean()) >= 0.75, (what, float((diff <= atol).float().mean()))
