"""ptl: model.ptl, the traced TorchScript saved for the lite interpreter (the guides' TorchMobile path; a
phone format, not served). No optimize_for_mobile: it needs XNNPACK, which this torch build leaves out, and
torch.jit.optimize_for_inference before a lite save crashed the process (segfault)."""

from model_src.backends import Backend, ExportJob
from model_src.backends._torch import quiet_deprecations, trace


def export(job: ExportJob, path: str):
    """Write the traced fused model for the lite interpreter."""
    with quiet_deprecations():
        trace(job.fused, job.example)._save_for_lite_interpreter(path)


class LiteRunner:
    """A lite-interpreter module as a backend's callable: float batch -> logits."""

    def __init__(self, path: str):
        import torch.jit.mobile  # not imported by `import torch`

        with quiet_deprecations():
            self.module = torch.jit.mobile._load_for_lite_interpreter(path)

    def __call__(self, batch):
        """Float batch (B, C, H, W) -> logits (B, K)."""
        import torch

        with torch.inference_mode():
            return self.module(batch.float().contiguous())


def load(path: str, device: str, threads: int | None = None) -> LiteRunner:
    """A LiteRunner for `path` (on the CPU, whatever `device`)."""
    return LiteRunner(path)


BACKEND = Backend(
    name="ptl",
    file="model.ptl",
    gpu=False,
    differentiable=False,
    server=False,
    exact=True,
    precision="fp32",
    export=export,
    load=load,
    runtime="lite interpreter",
)
