"""Load a serving file for one backend and run it: used by the handler, export checks and evaluation.

Backends and their files:
  eager        model.pt             plain dict (model_args + state_dict), rebuilt with build_model
  torchscript  model.torchscript.pt torch.jit.load
  onnx         model.onnx           ONNX Runtime, CPU provider
  int8         model.int8.pt        TorchScript of the dynamically quantised model
"""

import os
import warnings

import torch

BACKEND_FILES = {
    "eager": "model.pt",
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
    "int8": "model.int8.pt",
}
# Backends whose served file has no gradients: their archives carry the eager weights (model.pt) as well, and
# explanations run on those (deploy/archive.py packs them, the handler loads them).
NOT_DIFFERENTIABLE = ("onnx", "int8")


class Predictor:
    """A callable float batch (B, C, H, W) -> logits (B, K) for any backend.

    `threads` sizes this object's own pools (ONNX Runtime's session). torch's intra-op pool belongs to
    the whole process: the caller sets it (the TorchServe handler does, in initialize)."""

    def __init__(self, path: str, backend: str, device="cpu", threads: int | None = None):
        if backend not in BACKEND_FILES:
            raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKEND_FILES)}")
        self.backend, self.device = backend, torch.device(device)
        if backend == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            # One intra-op pool sized by the caller: ORT's default takes every core,
            # which oversubscribes the machine as soon as there are two workers.
            opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
            opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
        elif backend == "eager":
            from model_src.net import load_model

            self.model = load_model(path, map_location=self.device)[0].to(self.device)
        else:
            with warnings.catch_warnings():  # TorchScript loading warns it is deprecated
                warnings.simplefilter("ignore", FutureWarning)
                self.model = torch.jit.load(path, map_location=self.device).eval()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.backend == "onnx":
            (logits,) = self.session.run(None, {self.input_name: batch.cpu().numpy()})
            return torch.from_numpy(logits)
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()
