"""Mobile and edge formats for train.export: TorchScript for the lite interpreter (.ptl) and ExecuTorch (.pte).

  ptl  model.ptl  traced TorchScript saved for the lite interpreter (the guides' TorchMobile path, deprecated
                  in torch: `optimize_for_mobile` needs XNNPACK, which this torch build leaves out)
  pte  model.pte  ExecuTorch program, XNNPACK delegate, input fixed at batch 1 (what a phone sends)

Each is loaded back by its own runtime for export's checks (the lite interpreter, ExecuTorch's Python
runtime). ExecuTorch is optional: `scripts/setup.sh --mobile` installs requirements-mobile.txt.
Beside them goes preprocessing.json, what an app must do to a photo, written from the checkpoint's
Preprocessing (model_src/preprocessing.py), the definition training and the handler use.
"""

import contextlib
import importlib.util
import json
import os
import re
import warnings

import torch

from model_src.preprocessing import Preprocessing

MOBILE_FILES = {"ptl": "model.ptl", "pte": "model.pte"}
PHONE_JSON = "preprocessing.json"
SETUP_HINT = "scripts/setup.sh --mobile"
# torch.export's verifier names the first operator outside the Core ATen opset that ExecuTorch runs.
NOT_CORE_ATEN = re.compile(r"Operator (?:torch\._ops\.)?(\S+) is not in Core ATen opset")


class MobileExportError(RuntimeError):
    """A mobile format cannot be made: ExecuTorch missing, or an operator it cannot lower."""


def require_executorch():
    if importlib.util.find_spec("executorch") is None:
        raise MobileExportError(f"the pte format needs ExecuTorch, an optional install: run {SETUP_HINT}")


@contextlib.contextmanager
def quiet_deprecations():
    """TorchScript and the lite interpreter warn that they are deprecated at every call; the docs say it once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def export_ptl(traced: torch.jit.ScriptModule, path: str):
    """`traced` is train.export's TorchScript trace (any batch size). No optimize_for_mobile: it needs
    XNNPACK; torch.jit.optimize_for_inference before a lite save crashed the process (segfault)."""
    with quiet_deprecations():
        traced._save_for_lite_interpreter(path)


def export_pte(fused: torch.nn.Module, example: torch.Tensor, path: str):
    """torch.export at batch 1 -> edge dialect -> XNNPACK delegate -> ExecuTorch program."""
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        with torch.no_grad():  # inference graph: no training-only operators reach the verifier
            program = torch.export.export(fused, (example[:1].contiguous(),), strict=False)
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as e:
        if m := NOT_CORE_ATEN.search(str(e)):
            raise MobileExportError(
                f"pte: ExecuTorch cannot lower operator {m[1]} (not in the Core ATen opset that its runtime "
                "kernels cover); replace it in the model or export another format"
            ) from None
        raise MobileExportError(f"pte: ExecuTorch could not lower the model: {e.__class__.__name__}: {e}") from e
    with open(path, "wb") as f:
        f.write(lowered.buffer)


class MobilePredictor:
    """Runs a .ptl or .pte file in its own runtime: float batch (B, C, H, W) -> logits (B, K).

    The .pte program takes one image (its input shape is fixed), so a batch runs one image at a time."""

    def __init__(self, path: str, fmt: str):
        if fmt not in MOBILE_FILES:
            raise ValueError(f"unknown mobile format {fmt!r}; choose one of {sorted(MOBILE_FILES)}")
        self.fmt = fmt
        if fmt == "ptl":
            import torch.jit.mobile  # not imported by `import torch`

            with quiet_deprecations():
                self.module = torch.jit.mobile._load_for_lite_interpreter(path)
        else:
            require_executorch()
            from executorch.runtime import Runtime

            self.method = Runtime.get().load_program(path).load_method("forward")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.float().contiguous()
        with torch.inference_mode():
            if self.fmt == "ptl":
                return self.module(batch)
            return torch.cat([self.method.execute([x[None]])[0] for x in batch])


def phone_preprocessing(prep: Preprocessing, class_names: list[str]) -> dict:
    """What an app does to a photo to get the model's input, derived from the checkpoint's Preprocessing
    (its fields are copied as they are; the steps say in words what Preprocessing.__call__ does)."""
    grey = prep.channels == 1
    size = prep.image_size
    if prep.resize_size is None:
        resize = f"resize to {size}x{size} (bilinear; the aspect ratio is not kept)"
    else:
        resize = f"resize so the shorter side is {prep.resize_size} (bilinear), then crop the centre {size}x{size}"
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
        "output": "logits, shape [1, number of classes]: softmax for probabilities; index i is class_names[i]",
        "class_names": class_names,
    }


def write_phone_preprocessing(out_dir: str, prep: Preprocessing, class_names: list[str]):
    with open(os.path.join(out_dir, PHONE_JSON), "w") as f:
        json.dump(phone_preprocessing(prep, class_names), f, indent=1)
