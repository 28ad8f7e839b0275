"""eager: model.pt, a plain dict (the state_dict and the bundle manifest), rebuilt with
model_src.net.build_model."""

from model_src.backends import Backend, ExportJob
from model_src.backends._torch import TorchRunner


def export(job: ExportJob, path: str):
    """Write model.pt: the eager state_dict and the manifest, as a plain dict."""
    import torch

    torch.save({"model": job.model.state_dict(), "manifest": job.manifest.to_dict()}, path)


def load(path: str, device: str, threads: int | None = None) -> TorchRunner:
    """model.pt rebuilt with build_model on `device`, as a TorchRunner."""
    from model_src.net import load_model

    return TorchRunner(load_model(path, map_location=device)[0].to(device), device)


BACKEND = Backend(
    name="eager",
    file="model.pt",
    gpu=True,
    differentiable=True,
    server=True,
    exact=True,
    precision="fp32",
    export=export,
    load=load,
)
