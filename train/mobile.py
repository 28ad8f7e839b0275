"""What an app must do to a photo before the phone formats (model_src/backends/ptl.py and pte.py) run it.

Beside a phone format, train.export writes preprocessing.json, derived from the manifest's Preprocessing
(model_src/preprocessing.py), the definition training and the handler use.
"""

import json
import os

from model_src.manifest import Manifest
from model_src.preprocessing import Preprocessing

PHONE_JSON = "preprocessing.json"


def phone_preprocessing(prep: Preprocessing, class_names: list[str]) -> dict:
    """What an app does to a photo to get the model's input, derived from the checkpoint's Preprocessing
    (its fields are copied as they are; the steps say in words what Preprocessing.__call__ does)."""
    grey = prep.channels == 1
    size = prep.image_size
    if prep.resize_size is None:
        resize = f"resize to {size}x{size} (bilinear; the aspect ratio is not kept)"
    else:
        resize = (
            f"resize so the shorter side is {prep.resize_size} (bilinear), then crop the centre {size}x{size}"
        )
    return {
        **prep.to_dict(),
        "input_shape": [1, prep.channels, size, size],
        "dtype": "float32",
        "layout": "NCHW: channel planes one after another, rows top to bottom, pixels left to right",
        "channel_order": "L (grey = 0.299 R + 0.587 G + 0.114 B)" if grey else "RGB",
        "steps": [
            "apply the EXIF orientation",
            f"composite transparent pixels onto ({prep.background}, {prep.background}, {prep.background})",
            "convert to grey (L)" if grey else "convert to RGB",
            resize,
            "divide each 8-bit value by 255",
            "subtract mean[c] and divide by std[c] for each channel c",
        ],
        "output": "logits, shape [1, number of classes]: softmax for probabilities; index i is "
        "class_names[i]",
        "class_names": class_names,
    }


def write_phone_preprocessing(out_dir: str, manifest: Manifest):
    """Write preprocessing.json (the app's preprocessing steps and class names) into `out_dir`."""
    with open(os.path.join(out_dir, PHONE_JSON), "w") as f:
        prep = Preprocessing.from_dict(manifest.preprocessing)
        json.dump(phone_preprocessing(prep, manifest.class_names), f, indent=1)
