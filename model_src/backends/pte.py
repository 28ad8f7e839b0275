"""pte: model.pte, an ExecuTorch program with the XNNPACK delegate, input fixed at batch 1 (what a phone
sends). A phone format, not served. ExecuTorch is optional: `scripts/setup.sh --mobile` installs
requirements-mobile.txt."""

import importlib.util
import re

from model_src.backends import Backend, ExportError, ExportJob

SETUP_HINT = "scripts/setup.sh --mobile"
# torch.export's verifier names the first operator outside the Core ATen opset that ExecuTorch runs.
NOT_CORE_ATEN = re.compile(r"Operator (?:torch\._ops\.)?(\S+) is not in Core ATen opset")


class MobileExportError(ExportError):
    """A mobile format cannot be made: ExecuTorch missing, or an operator it cannot lower."""


def available() -> str | None:
    """None if ExecuTorch is installed, else how to install it."""
    if importlib.util.find_spec("executorch") is None:
        return f"the pte format needs ExecuTorch, an optional install: run {SETUP_HINT}"
    return None


def require_executorch():
    """Raise MobileExportError, saying how to install it, if ExecuTorch is missing."""
    if why := available():
        raise MobileExportError(why)


def export(job: ExportJob, path: str):
    """torch.export at batch 1 -> edge dialect -> XNNPACK delegate -> ExecuTorch program."""
    require_executorch()
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        with torch.no_grad():  # inference graph: no training-only operators reach the verifier
            program = torch.export.export(job.fused, (job.example[:1].contiguous(),), strict=False)
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as e:
        if m := NOT_CORE_ATEN.search(str(e)):
            raise MobileExportError(
                f"pte: ExecuTorch cannot lower operator {m[1]} (not in the Core ATen opset that its runtime "
                "kernels cover); replace it in the model or export another format"
            ) from None
        raise MobileExportError(
            f"pte: ExecuTorch could not lower the model: {e.__class__.__name__}: {e}"
        ) from e
    with open(path, "wb") as f:
        f.write(lowered.buffer)


class ExecuTorchRunner:
    """The program takes one image (its input shape is fixed), so a batch runs one image at a time."""

    def __init__(self, path: str):
        require_executorch()
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(path).load_method("forward")

    def __call__(self, batch):
        """Float batch (B, C, H, W) -> logits (B, K), one image per call of the program."""
        import torch

        batch = batch.float().contiguous()
        with torch.inference_mode():
            return torch.cat([self.method.execute([x[None]])[0] for x in batch])


def load(path: str, device: str, threads: int | None = None) -> ExecuTorchRunner:
    """An ExecuTorchRunner for the program at `path` (on the CPU, whatever `device`)."""
    return ExecuTorchRunner(path)


BACKEND = Backend(
    name="pte",
    file="model.pte",
    gpu=False,
    differentiable=False,
    server=False,
    exact=True,
    precision="fp32",
    export=export,
    load=load,
    runtime="executorch xnnpack",
    available=available,
)
