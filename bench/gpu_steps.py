"""The in-process parts of bench/gpu.py: a few AMP training steps, the exported formats loaded on the device,
their ms per image and their agreement with the eager model on that device."""

import itertools
import os
import time
from collections.abc import Callable

import torch

from model_src import backends
from model_src.manifest import Manifest, Provenance
from model_src.preprocessing import Preprocessing


def sync(device: torch.device):
    """Wait for the device's queued kernels: a CUDA timing without it measures only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_args(data: str, out: str, device: torch.device, batch: int, steps: int, weights: str | None):
    """train.train's own command line for a short AMP run on `device` (`weights`: fine-tune from them)."""
    from train.train import get_args_parser

    argv = ["--data", data, "--output-dir", out, "--amp", "--device", device.type, "--batch-size", str(batch)]
    argv += ["--quiet", "--no-tensorboard", "--no-plots", "--limit-samples", str(batch * (steps + 1))]
    if weights:
        argv += ["--weights", weights]
    return get_args_parser().parse_args(argv)


def train_steps(
    data: str, out: str, device: torch.device, steps: int, batch: int, weights: str | None = None
) -> tuple[float, str]:
    """`steps` optimiser steps with AMP (train.loop: fp16 autocast + GradScaler on CUDA, bf16 autocast on the
    CPU) after one warm-up step, on batches already in memory; returns (ms/step, the trained checkpoint)."""
    from train import finetune
    from train.loop import train_one_epoch
    from train.train import build_learner, load_data, prepare_run

    args = train_args(data, out, device, batch, steps, weights)
    os.makedirs(out, exist_ok=True)
    pre = finetune.prepare(args, None, 1)
    prepare_run(args, None, 0, 1)
    run_data = load_data(args, None, pre, 0, 1)
    m = build_learner(args, run_data, None, None, pre, device, 1, 0)
    if args.finetune_from:
        finetune.enter_epoch(m.model_without_ddp, args, 1, lambda msg: None)
    batches = list(itertools.islice(itertools.cycle(run_data.train_loader), steps + 1))
    train_one_epoch(m.model, m.criterion, m.optimizer, batches[:1], device, 0, args, m.scaler)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    train_one_epoch(m.model, m.criterion, m.optimizer, batches[1:], device, 1, args, m.scaler)
    sync(device)
    ms = (time.perf_counter() - t0) * 1000 / steps
    source = f"bench/gpu.py: {steps + 1} AMP steps on {device.type} from {weights or 'random weights'}"
    manifest = Manifest(
        m.model_args, run_data.class_names, run_data.prep.to_dict(), Provenance(data=args.data, source=source)
    )
    checkpoint = os.path.join(out, "checkpoint.pt")
    torch.save({"model": m.model_without_ddp.state_dict(), "manifest": manifest.to_dict()}, checkpoint)
    return ms, checkpoint


ORT_PROVIDER = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
ORT_GPU_PIP = "pip install onnxruntime-gpu (the version of requirements.txt's onnxruntime)"


def onnx_missing(device: torch.device) -> str | None:
    """Why ONNX Runtime cannot run on `device` here (None: it can)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if ORT_PROVIDER[device.type] not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no {ORT_PROVIDER[device.type]} here ({ORT_GPU_PIP})"
    return None


def formats(device: torch.device) -> list[str]:
    """What to export and check: eager and TorchScript, and ONNX where ONNX Runtime runs on `device`."""
    return ["eager", "torchscript"] + ([] if onnx_missing(device) else ["onnx"])


def load_on(export_dir: str, name: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported `name` file loaded to run on `device`: a callable batch -> logits (CPU)."""
    backend = backends.get(name)
    return backends.load(os.path.join(export_dir, backend.file), name, str(device))


def ms_per_image(run, x: torch.Tensor, device: torch.device, seconds: float) -> float:
    """ms per image of run(x) repeated for `seconds` after three warm-up calls, synchronised."""
    for _ in range(3):
        run(x)
    sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(x)
        n += len(x)
    sync(device)
    return (time.perf_counter() - t0) * 1000 / n


def inputs(prep: Preprocessing, bodies: list[bytes]) -> torch.Tensor:
    """The request bodies as the handler's model input (decode, resize and crop, normalise)."""
    return torch.stack([prep(prep.decode(b)) for b in bodies])


def probabilities(run, x: torch.Tensor) -> torch.Tensor:
    """Softmax of run() over x, one image at a time (batch 1, like a served request alone)."""
    return torch.cat([torch.softmax(run(x[i : i + 1]).float(), 1) for i in range(len(x))])


def measure(export_dir: str, name: str, device: torch.device, x: torch.Tensor, eager, seconds: float) -> dict:
    """One format on the device: ms per image at batch 1 and 8, and its agreement with eager on `x`."""
    run = load_on(export_dir, name, device)
    batch8 = x[torch.arange(8) % len(x)]
    got, want = probabilities(run, x), probabilities(eager, x)
    return {
        "ms_b1": ms_per_image(run, x[:1], device, seconds),
        "ms_b8": ms_per_image(run, batch8, device, seconds),
        "top1_agree": int((got.argmax(1) == want.argmax(1)).sum()),
        "checked": len(x),
        "max_dprob": float((got - want).abs().max()),
    }
