"""torchscript: model.torchscript.pt, the traced fused model (torch.jit.load)."""

from model_src.backends import Backend, ExportJob
from model_src.backends._torch import load_script, quiet_deprecations, trace


def export(job: ExportJob, path: str):
    """Write the traced fused model as TorchScript."""
    import torch

    with quiet_deprecations():
        torch.jit.save(trace(job.fused, job.example), path)


BACKEND = Backend(
    name="torchscript",
    file="model.torchscript.pt",
    gpu=True,
    differentiable=True,
    server=True,
    exact=True,
    precision="fp32",
    export=export,
    load=load_script,
)
