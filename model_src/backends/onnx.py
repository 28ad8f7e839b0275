"""onnx: model.onnx, run by ONNX Runtime's CPU provider (no gradients: explanations use the eager weights)."""

import importlib.util
import warnings

from model_src.backends import Backend, BackendUnavailable, ExportJob
from model_src.cores import usable_cores


def export(job: ExportJob, path: str):
    """Write the fused model as ONNX with a free batch size, then run onnx.checker's full check on it."""
    import onnx
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            job.fused,
            (job.example,),
            path,
            input_names=["input"],
            output_names=["logits"],
            # Positional (one entry per input), so it does not depend on what forward names its argument.
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    onnx.checker.check_model(onnx.load(path), full_check=True)


def providers(device: str, available: list[str]) -> list:
    """ONNX Runtime's execution providers for `device`: the CPU's, or CUDA's on the device's index (CPU for
    the operators it lacks). BackendUnavailable for CUDA when this onnxruntime has no CUDA provider: a
    silent fallback would measure the CPU and call it the GPU."""
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise BackendUnavailable(
            f"this onnxruntime has no CUDAExecutionProvider (it has {available}): install onnxruntime-gpu "
            "in place of onnxruntime to run ONNX on CUDA"
        )
    index = int(device.partition(":")[2] or 0)
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


class OnnxRunner:
    """An ONNX Runtime session as a backend's callable: float batch -> logits tensor (CPU)."""

    def __init__(self, path: str, threads: int | None, device: str = "cpu"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # One intra-op pool sized by the caller: ORT's default takes every core,
        # which oversubscribes the machine as soon as there are two workers.
        opts.intra_op_num_threads = threads or usable_cores()
        opts.inter_op_num_threads = 1
        chosen = providers(device, ort.get_available_providers())
        self.session = ort.InferenceSession(path, opts, providers=chosen)
        if device.startswith("cuda") and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # the provider is built in but could not start (CUDA or cuDNN libraries of another version): ONNX
            # Runtime warns and runs on the CPU, which a GPU row would then report as the GPU's speed
            raise BackendUnavailable(
                "ONNX Runtime could not start its CUDA provider (the session runs "
                f"{self.session.get_providers()}); its log says why"
            )
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch):
        """Float batch (B, C, H, W) -> logits (B, K), on the CPU."""
        import torch

        (logits,) = self.session.run(None, {self.input_name: batch.cpu().numpy()})
        return torch.from_numpy(logits)


def load(path: str, device: str, threads: int | None = None) -> OnnxRunner:
    """An OnnxRunner for `path` on `device` (TorchServe's workers ask for the CPU: BACKEND.gpu is False;
    bench/gpu.py asks for CUDA); `threads` sizes its intra-op pool (default: every core it may use)."""
    return OnnxRunner(path, threads, device)


def available() -> str | None:
    """None if ONNX Runtime is installed, else why not."""
    return None if importlib.util.find_spec("onnxruntime") else "onnxruntime is not installed"


BACKEND = Backend(
    name="onnx",
    file="model.onnx",
    gpu=False,
    differentiable=False,
    server=True,
    exact=True,
    precision="fp32",
    export=export,
    load=load,
    runtime="onnxruntime",
    available=available,
)
