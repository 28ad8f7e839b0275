"""Why the model said what it said: Integrated Gradients (Captum) on the preprocessed input.

Used by the handler's /explanations route and by tests without a server. Captum is imported on the first
explanation only, so a worker that never explains never pays for it.

The baseline is a blank image of the preprocessing's background colour (white paper for the digits): the
attribution of a pixel then says how much drawing it, rather than leaving it blank, moved the class's score.
"""

import base64
import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model_src.image_checks import InputError
from model_src.preprocessing import Preprocessing

MAX_GRID = 32  # side of the returned attribution grid: a readable, bounded answer whatever the input size
OVERLAY_SIDE = 256  # the optional PNG overlay is scaled up to about this size
# Integrated Gradients steps: the fewest worth answering with, and the number a worker's first explanation
# takes while it measures what one step costs on this model and machine.
MIN_STEPS, FIRST_STEPS = 4, 8


def baseline_for(prep: Preprocessing) -> torch.Tensor:
    """A blank image of the background colour, preprocessed: (1, C, H, W)."""
    blank = Image.new(
        "L" if prep.channels == 1 else "RGB", (prep.image_size,) * 2, (prep.background,) * prep.channels
    )
    return prep.to_tensor(blank).unsqueeze(0)


def model_device(model) -> torch.device:
    """Where a module's parameters are (the CPU for one without any)."""
    return next(iter(model.parameters()), torch.empty(0)).device


def integrated_gradients(model, x: torch.Tensor, target: int, baseline: torch.Tensor, steps: int):
    """x (1, C, H, W) -> (attributions (C, H, W), convergence delta): how far the attributions' sum is from
    score(x) - score(baseline), Integrated Gradients' own error estimate."""
    from captum.attr import IntegratedGradients

    with torch.enable_grad():  # TorchServe may call the handler under inference_mode
        ig = IntegratedGradients(model)
        attr, delta = ig.attribute(
            x.clone().requires_grad_(True),
            baselines=baseline,
            target=target,
            n_steps=steps,
            internal_batch_size=steps,  # one forward/backward over all steps: memory is (steps, C, H, W)
            return_convergence_delta=True,
        )
    return attr[0].detach().cpu(), float(delta.abs().max())


def to_grid(attr: torch.Tensor, max_side: int = MAX_GRID) -> torch.Tensor:
    """(C, H, W) attributions -> (h, w) signed map summed over channels, pooled to at most max_side a side and
    scaled to [-1, 1] by its largest magnitude."""
    grid = attr.sum(0, keepdim=True)[None]  # (1, 1, H, W)
    h, w = grid.shape[-2:]
    if max(h, w) > max_side:
        grid = F.adaptive_avg_pool2d(grid, (min(h, max_side), min(w, max_side)))
    grid = grid[0, 0]
    peak = grid.abs().max()
    return grid / peak if peak > 0 else grid


def overlay_png(prepared: Image.Image, grid: torch.Tensor) -> str:
    """The model's view of the image in grey with |attribution| in red on top, as base64 PNG."""
    scale = max(1, OVERLAY_SIDE // max(prepared.size))
    size = (prepared.width * scale, prepared.height * scale)
    grey = np.asarray(prepared.convert("L").resize(size, Image.Resampling.NEAREST), dtype=np.float32)
    heat = Image.fromarray((grid.abs().numpy() * 255).astype(np.uint8)).resize(
        size, Image.Resampling.BILINEAR
    )
    alpha = np.asarray(heat, dtype=np.float32)[..., None] / 255.0
    red = np.zeros((*grey.shape, 3), np.float32)
    red[..., 0] = 255
    rgb = (1 - alpha) * np.repeat(grey[..., None], 3, axis=2) + alpha * red
    buf = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def explain(
    model,
    prep: Preprocessing,
    img: Image.Image,
    labels: list[str],
    target: int | None,
    steps: int,
    overlay: bool = False,
) -> dict:
    """One decoded image -> the answer body: the class explained, its probability and the attribution grid."""
    prepared = prep.prepare(img)
    device = model_device(model)  # a GPU worker's model: the image and the baseline go where it is
    x = prep.to_tensor(prepared).unsqueeze(0).to(device)
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), dim=1)[0].cpu()
    target = int(probs.argmax()) if target is None else target
    attr, delta = integrated_gradients(model, x, target, baseline_for(prep).to(device), steps)
    grid = to_grid(attr)
    answer = {
        "class": labels[target],
        "probability": round(float(probs[target]), 6),
        "method": "integrated_gradients",
        "steps": steps,
        "baseline": f"blank image of background {prep.background}",
        "shape": list(grid.shape),
        "attributions": [[round(v, 4) for v in row] for row in grid.tolist()],
        "convergence_delta": round(delta, 6),
    }
    if overlay:
        answer["overlay_png"] = overlay_png(prepared, grid)
    return answer


class StepBudget:
    """Explanations within a time budget: each image gets the Integrated Gradients steps that fit in what is
    left of it (measured per worker), and one that would not fit gets a 503 to retry. So a batch of slow
    explanations never runs into the timeout that would kill the worker and every request in its batch."""

    def __init__(self, steps: int, clock: Callable[[], float] = time.perf_counter):
        self.steps = steps  # the most steps an explanation takes (explain_steps)
        self.step_seconds: float | None = None  # measured cost of one step; None until the first explanation
        self.clock = clock

    def affordable(self, seconds_left: float) -> int:
        """`steps`, or fewer when the time left (with a 1.5x margin on the measured cost of a step) holds
        fewer; 503 below MIN_STEPS. The first explanation takes FIRST_STEPS and measures the cost."""
        want = self.steps
        steps = (
            min(want, FIRST_STEPS)
            if self.step_seconds is None
            else int(seconds_left / (1.5 * self.step_seconds))
        )
        if seconds_left <= 0 or steps < min(MIN_STEPS, want):
            raise InputError("this batch's time for explanations is spent: retry, or send fewer images", 503)
        return min(steps, want)

    def explain_each(
        self, imgs: list, deadline: float, explain_one: Callable[[Any, int], dict]
    ) -> list[dict]:
        """explain_one(img, steps) for each image, one at a time, with the steps that fit before `deadline`
        (a time of `clock`); InputError 503 once they do not."""
        results = []
        for img in imgs:
            steps = self.affordable(deadline - self.clock())
            began = self.clock()
            results.append(explain_one(img, steps))
            self.step_seconds = (self.clock() - began) / steps
        return results
