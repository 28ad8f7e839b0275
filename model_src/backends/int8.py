"""int8: model.int8.pt, TorchScript of the dynamically quantised model (Linear layers, per-channel weight
scales).

Quantised kernels exist for the CPU only, and the traced graph has no gradients worth explaining with."""

import copy
import warnings

from model_src.backends import Backend, ExportJob
from model_src.backends._torch import load_script


def quantize(fused):
    """A copy of `fused` with its Linear layers dynamically quantised to int8 (per-channel weight scales)."""
    import torch
    from torch import nn

    # torch.ao.quantization is deprecated but still the dynamic-quant API here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # Per output channel weight scales: a 1000-class ImageNet head has rows of very different
        # ranges, and one scale for all of them flips near-tied top-1s (measured in tests/test_pretrained.py).
        return quantize_dynamic(
            copy.deepcopy(fused), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
        )


def export(job: ExportJob, path: str):
    """Write the dynamically quantised model, traced, as TorchScript."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(quantize(job.fused), job.example, check_trace=False)
        torch.jit.save(traced, path)


BACKEND = Backend(
    name="int8",
    file="model.int8.pt",
    gpu=False,
    differentiable=False,
    server=True,
    exact=False,
    precision="int8",
    export=export,
    load=load_script,
)
