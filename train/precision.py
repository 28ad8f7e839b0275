"""The precision gate: may a reduced-precision predictor (bf16, int8) stand in for the eager fp32 model?

Judged on at least MIN_CROPS random crops of real photos (the bundled ImageNet photos for an ImageNet model,
the validation split for a model trained here), against fp32 itself:
  agreement        the candidate's top-1 (judged alone and in batches of BATCH: it must agree both ways)
                   equals fp32's on at least as many crops as fp32 agrees with itself when each input
                   value moves by one grey level (the noise floor, measured on the same crops): real crops
                   are full of near-ties, which a raw "99 %" bar would blame on the candidate. The floor is
                   the lowest of NOISE_DRAWS draws of that noise: one draw is a coin toss at these counts
                   (the quickstart's digits model, 400 crops: 10 draws flip 0, 1 or 2 crops, a floor of
                   100 %, 99.75 % or 99.5 %; torch int8 flips 2);
  confident        100 % agreement on the crops where fp32's top-1 leads the runner-up by >= MARGIN;
  labelled         on a labelled split, not one image more wrong than fp32 (no loss of accuracy);
  max |Δprob|      reported, not judged (int8 moves probabilities a few hundredths and still passes the
                   above).
A candidate that fails is refused with PrecisionError, whose message holds every figure.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from model_src.preprocessing import Preprocessing
from train import photos

MIN_CROPS = 400
MARGIN = 0.05  # fp32's top-1 probability minus its runner-up's, from which a candidate must agree
BATCH = 32
NOISE_DRAWS = 8  # draws of one-grey-level noise; the floor is the lowest agreement among them


class PrecisionError(ValueError):
    """A candidate that does not pass the gate; the message says which test failed, with the figures."""


@dataclass
class GateResult:
    """The precision gate's figures for one candidate, and its verdict."""

    crops: int
    agreement: float  # share of crops where the candidate's top-1 is fp32's
    noise_floor: float  # lowest share, over NOISE_DRAWS draws, of crops where fp32 survives one grey level
    confident: int  # crops where fp32's top-1 leads by >= MARGIN
    confident_agreement: float
    max_dprob: float  # largest |candidate prob - fp32 prob| over crops and classes
    labelled: int = 0  # images of the labelled split (0: none given)
    wrong_fp32: int = 0
    wrong_candidate: int = 0

    def failures(self) -> list[str]:
        """Why the candidate fails the gate, one line per failed test (empty: it passes)."""
        why = []
        if self.agreement < self.noise_floor:
            why.append(
                f"top-1 agreement {self.agreement:.2%} is below fp32's own noise floor {self.noise_floor:.2%}"
            )
        if self.confident_agreement < 1.0:
            why.append(
                f"top-1 agreement is {self.confident_agreement:.2%} on the {self.confident} crops where "
                f"fp32 leads by >= {MARGIN} (must be 100 %)"
            )
        if self.wrong_candidate > self.wrong_fp32:
            why.append(
                f"{self.wrong_candidate} of {self.labelled} labelled images wrong, fp32 gets "
                f"{self.wrong_fp32} wrong"
            )
        return why

    @property
    def passed(self) -> bool:
        """True if the candidate passes every test of the gate."""
        return not self.failures()

    def figures(self) -> str:
        """The gate's figures in one line, for messages and reports."""
        labelled = f"; labelled: {self.wrong_candidate}/{self.labelled} wrong (fp32 {self.wrong_fp32})"
        return (
            f"{self.crops} crops: top-1 agreement {self.agreement:.2%} (noise floor {self.noise_floor:.2%}), "
            f"{self.confident_agreement:.2%} where fp32 leads by >= {MARGIN} ({self.confident} crops), "
            f"max |Δprob| {self.max_dprob:.4f}" + (labelled if self.labelled else "")
        )

    def to_dict(self) -> dict:
        """The figures and the verdict ("passed") as a JSON-ready dict."""
        return {**self.__dict__, "passed": self.passed}


def probabilities(predict: Callable, x: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    """Softmax of `predict`'s logits, `batch` rows at a time: (N, K) float32."""
    with torch.inference_mode():
        return torch.cat([torch.softmax(predict(b).float(), dim=1) for b in x.split(batch)])


def grey_noise(x: torch.Tensor, prep: Preprocessing, seed: int = 0) -> torch.Tensor:
    """`x` with every value moved one grey level up or down (a random sign each), in normalised units."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, x.shape, generator=g, dtype=torch.float32) * 2 - 1
    step = (1 / 255) / torch.tensor(prep.std, dtype=torch.float32).view(1, -1, 1, 1)
    return x + sign * step


@dataclass
class Reference:
    """fp32's side of the gate, computed once for any number of candidates on the same crops: its
    probabilities, its noise floor (NOISE_DRAWS eager passes over the crops: most of the gate's cost) and its
    mistakes on the labelled split."""

    probs: torch.Tensor
    noise_floor: float
    labelled: tuple[torch.Tensor, torch.Tensor] | None = None
    wrong_fp32: int = 0

    @classmethod
    def of(
        cls,
        model: torch.nn.Module,
        crops: torch.Tensor,
        prep: Preprocessing,
        labelled: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> "Reference":
        """The eager fp32 `model`'s (eval mode) reference on `crops` and the labelled split."""
        if len(crops) < MIN_CROPS:
            raise ValueError(f"the precision gate needs at least {MIN_CROPS} crops, got {len(crops)}")
        probs = probabilities(model, crops)
        noisy = [probabilities(model, grey_noise(crops, prep, seed)) for seed in range(NOISE_DRAWS)]
        floor = min(float((n.argmax(1) == probs.argmax(1)).float().mean()) for n in noisy)
        wrong = (
            0 if labelled is None else int((probabilities(model, labelled[0]).argmax(1) != labelled[1]).sum())
        )
        return cls(probs, floor, labelled, wrong)


def evaluate(
    model: torch.nn.Module,
    candidate: Callable,
    crops: torch.Tensor,
    prep: Preprocessing,
    labelled: tuple[torch.Tensor, torch.Tensor] | None = None,
    reference: Reference | None = None,
) -> GateResult:
    """The gate's figures for `candidate` (float batch -> logits) against the eager fp32 `model` (eval
    mode); `reference`, if given, is Reference.of(model, crops, prep, labelled), reused."""
    ref = reference or Reference.of(model, crops, prep, labelled)
    # Judged alone and in batches: a dynamically quantised model's answer to one input depends on the
    # others in its batch (the scale is the batch's), and serving batches whatever arrives together.
    got = [probabilities(candidate, crops, size) for size in (1, BATCH)]
    top2 = ref.probs.topk(2, dim=1).values
    confident = (top2[:, 0] - top2[:, 1]) >= MARGIN
    agree = torch.stack([g.argmax(1) == ref.probs.argmax(1) for g in got]).all(0)  # right alone and batched
    result = GateResult(
        crops=len(crops),
        agreement=float(agree.float().mean()),
        noise_floor=ref.noise_floor,
        confident=int(confident.sum()),
        confident_agreement=float(agree[confident].float().mean()) if confident.any() else 1.0,
        max_dprob=max(float((g - ref.probs).abs().max()) for g in got),
    )
    if ref.labelled is not None:
        x, y = ref.labelled
        result.labelled, result.wrong_fp32 = len(y), ref.wrong_fp32
        result.wrong_candidate = int((probabilities(candidate, x).argmax(1) != y).sum())
    return result


def require(name: str, *args, **kwargs) -> GateResult:
    """evaluate(...), raising PrecisionError naming `name` and every figure when the candidate fails."""
    result = evaluate(*args, **kwargs)
    if failures := result.failures():
        raise PrecisionError(
            f"{name} refused by the precision gate: {'; '.join(failures)} ({result.figures()})"
        )
    return result


def random_crops(
    images: list[Image.Image], prep: Preprocessing, n: int = MIN_CROPS, seed: int = 0
) -> torch.Tensor:
    """`n` random square crops (train.photos.random_crop) of `images`, in turn, through `prep`: (n, C, H,
    W)."""
    rng = np.random.RandomState(seed)
    return prep.batch([prep.prepare(photos.random_crop(images[i % len(images)], rng)) for i in range(n)])


def photo_crops(prep: Preprocessing, n: int = MIN_CROPS, seed: int = 0) -> torch.Tensor:
    """Random crops of the bundled real photos (what an ImageNet model is checked on)."""
    return random_crops(list(photos.load_photos().values()), prep, n, seed)
