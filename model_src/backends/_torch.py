"""What the TorchScript-based backends share: tracing, quiet deprecation warnings, a runner with `.model`."""

import contextlib
import warnings


@contextlib.contextmanager
def quiet_deprecations():
    """TorchScript and the lite interpreter warn that they are deprecated at every call; the docs say it
    once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def trace(fused, example):
    """`fused` traced to TorchScript on `example` (batch size left free), without the warnings."""
    import torch

    with quiet_deprecations():  # TorchScript is deprecated in this torch, still the format TorchServe loads
        # Shape-dependent Python (EfficientNet-Lite's "SAME" padding) is traced as constants: right,
        # since the preprocessing fixes the input size; the batch size stays free.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(fused, example, check_trace=False)


class TorchRunner:
    """A torch module as a backend's callable; `.model` is the module (explanations take its gradients)."""

    def __init__(self, model, device: str):
        import torch

        self.model, self.device = model, torch.device(device)

    def __call__(self, batch):
        import torch

        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()


def load_script(path: str, device: str, threads: int | None = None) -> TorchRunner:
    """A TorchScript file loaded on `device` in eval mode, as a TorchRunner."""
    import torch

    with quiet_deprecations():
        return TorchRunner(torch.jit.load(path, map_location=device).eval(), device)
