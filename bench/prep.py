"""Preprocessing per stage, before and after issue 26, measured alternately in one run on one thread.

    python -m bench.prep                    # the per-stage table (docs/benchmarks.md, "Preprocessing per
                                            # stage")
    python -m bench.prep --rounds 3         # cheap mode
    python -m bench.prep --agreement 200    # also: EfficientNet-Lite0's top-1 under both, on photos and crops
    python -m bench.prep --normalise        # also: the to-tensor candidates (table, torch formula, fma)

Stages, for the bundled photos (scikit-image's and scikit-learn's, 451-640 px) as JPEGs of quality 90:
  decode          bytes -> PIL image (decode_image: the cheap checks, then Pillow at its JPEG draft scale)
  resize + crop   the decoded image -> the model's 224 x 224 RGB (Preprocessing.prepare)
  to tensor       -> normalised float32 (3, 224, 224)
"before" is the code this issue replaced, kept here to measure against: the draft asked for twice the resize,
the whole image was resized and then cropped, and normalisation was three passes over float copies.
Each round times every photo's stages before and after, alternating which goes first, each stage the least of
3 runs; the table gives the median over rounds and photos, and the spread of the per-round medians.
"""

import argparse
import io
import math
import statistics
import time

import numpy as np
import torch
from PIL import Image

from model_src.preprocessing import Preprocessing, center_crop, decode_image, shorter_side_to, to_mode
from train import photos, pretrained

PREP = Preprocessing(image_size=224, resize_size=256, channels=3, mean=[127 / 255] * 3, std=[128 / 255] * 3)
STAGES = ("decode", "resize + crop", "to tensor")


def get_args_parser():
    """The command line of `python -m bench.prep`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30, help="rounds over all photos (default 30)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the encoded photos (default 90)")
    p.add_argument(
        "--agreement", type=int, default=0, help="random crops for the top-1 agreement (default 0: skip)"
    )
    p.add_argument(
        "--normalise", action="store_true", help="also time the to-tensor candidates on 1 and 2 threads"
    )
    return p


def decode_before(prep: Preprocessing, data: bytes) -> Image.Image:
    """The old decode: Pillow's JPEG draft at twice the resize size."""
    return decode_image(data, draft_size=2 * prep.resize_size, resize_size=prep.resize_size)


def prepare_before(prep: Preprocessing, img: Image.Image) -> Image.Image:
    """The old resize + crop: the whole image resized, then centre-cropped."""
    img = to_mode(img, "RGB", prep.background)
    return center_crop(
        img.resize(shorter_side_to(img.size, prep.resize_size), Image.BILINEAR), prep.image_size
    )


def to_tensor_before(prep: Preprocessing, img: Image.Image) -> torch.Tensor:
    """The old to-tensor: normalised in separate passes over float copies."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr.transpose(2, 0, 1).copy())
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (prep.mean, prep.std))
    return (x - mean) / std


def normalise_table(prep: Preprocessing, img: Image.Image, out: torch.Tensor) -> torch.Tensor:
    """Today's to-tensor: one look-up per value in the per-channel table, into `out` (a batch row)."""
    return prep.to_tensor(img, out)


def normalise_formula(prep: Preprocessing, img: Image.Image, out: torch.Tensor) -> torch.Tensor:
    """torchvision's float formula in torch, in place in `out`: copy to float, / 255, - mean, / std."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (prep.mean, prep.std))
    out.copy_(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    return out.div_(255).sub_(mean).div_(std)


def normalise_fma(prep: Preprocessing, img: Image.Image, out: torch.Tensor) -> torch.Tensor:
    """mean and std folded into one multiply-add per channel, in place in `out` (not the formula exactly)."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (prep.mean, prep.std))
    out.copy_(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    return out.mul_(1 / (255 * std)).add_(-mean / std)


NORMALISERS = {
    "table look-up": normalise_table,
    "torch formula": normalise_formula,
    "torch multiply-add": normalise_fma,
}


def compare_normalisers(jpegs: dict[str, bytes], threads: int, repeats: int = 200) -> str:
    """The to-tensor candidates on the prepared photos with torch on `threads` threads: the least ms per image
    of `repeats` runs (median over the photos), and whether each gives torchvision's formula bit for bit."""
    torch.set_num_threads(threads)
    images = [PREP.prepare(PREP.decode(d)) for d in jpegs.values()]
    out, want = (
        torch.empty(3, PREP.image_size, PREP.image_size),
        torch.empty(3, PREP.image_size, PREP.image_size),
    )
    lines = [f"| to tensor, {threads} thread(s) | ms per image | = torchvision's formula |", "|---|---:|---|"]
    for name, normalise in NORMALISERS.items():
        times, same = [], True
        for img in images:
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                normalise(PREP, img, out)
                best = min(best, time.perf_counter() - start)
            times.append(best * 1000)
            same &= torch.equal(out, normalise_formula(PREP, img, want))
        lines.append(f"| {name} | {statistics.median(times):.3f} | {'yes' if same else 'no'} |")
    torch.set_num_threads(1)
    return "\n".join(lines)


PIPELINES = {
    "before": (decode_before, prepare_before, to_tensor_before),
    "after": (lambda p, d: p.decode(d), lambda p, i: p.prepare(i), lambda p, i: p.to_tensor(i)),
}


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """`img` as RGB JPEG bytes of quality `quality`."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def time_stages(name: str, data: bytes, repeats: int = 3) -> list[float]:
    """ms per stage of one image through one pipeline: the least of `repeats` runs of each stage, which drops
    the runs that another process preempted (on a shared machine, a 10 ms time slice inside a 1 ms stage)."""
    times, value = [], data
    for stage in PIPELINES[name]:
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            out = stage(PREP, value)
            best = min(best, time.perf_counter() - start)
        times.append(best * 1000)
        value = out
    return times


def measure(jpegs: dict[str, bytes], rounds: int, per_photo: dict[str, list[float]] | None = None):
    """name -> per round, the median ms of each stage and of the total over the photos; `per_photo`, if
    given, collects each photo's total after issue 26, round by round."""
    per_round: dict[str, list[list[float]]] = {name: [] for name in PIPELINES}
    for r in range(rounds):
        order = list(PIPELINES) if r % 2 == 0 else list(PIPELINES)[::-1]
        samples: dict[str, list[list[float]]] = {name: [] for name in PIPELINES}
        for photo, data in jpegs.items():
            for name in order:
                stages = time_stages(name, data)
                samples[name].append(stages + [sum(stages)])
                if per_photo is not None and name == "after":
                    per_photo.setdefault(photo, []).append(sum(stages))
        for name, rows in samples.items():
            per_round[name].append([statistics.median(col) for col in zip(*rows)])
    return per_round


def photo_table(jpegs: dict[str, bytes], per_photo: dict[str, list[float]]) -> str:
    """Each photo's total after issue 26 (median over rounds), and the median over the photos whose longer
    side is 450-600 px (issue 26's goal: <= 2.5 ms for those) and over all of them."""
    lines = ["| photo | size | total after, ms |", "|---|---|---:|"]
    in_range, every = [], []
    for photo, totals in per_photo.items():
        size = Image.open(io.BytesIO(jpegs[photo])).size
        ms = statistics.median(totals)
        lines.append(f"| {photo} | {size[0]}x{size[1]} | {ms:.2f} |")
        every.append(ms)
        if 450 <= max(size) <= 600:
            in_range.append(ms)
    lines.append(
        f"\nmedian over the {len(in_range)} photos of 450-600 px: {statistics.median(in_range):.2f} ms; "
        f"over all {len(every)}: {statistics.median(every):.2f} ms"
    )
    return "\n".join(lines)


def table(per_round: dict[str, list[list[float]]]) -> str:
    """The markdown table per stage and total: before, after (median and spread) and their ratio."""
    lines = ["| stage | before, ms | after, ms | after / before |", "|---|---:|---:|---:|"]
    for i, stage in enumerate(STAGES + ("total",)):
        cells = {}
        for name, rounds in per_round.items():
            values = [r[i] for r in rounds]
            q = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
            cells[name] = (statistics.median(values), q[0], q[-1])
        (b, b_lo, b_hi), (a, a_lo, a_hi) = cells["before"], cells["after"]
        lines.append(
            f"| {stage} | {b:.2f} ({b_lo:.2f}-{b_hi:.2f}) | {a:.2f} ({a_lo:.2f}-{a_hi:.2f}) | {a / b:.2f} |"
        )
    return "\n".join(lines)


def agreement(jpegs: dict[str, bytes], crops: int, quality: int) -> str:
    """EfficientNet-Lite0's top-1 on each photo and on random crops of them (as JPEGs), before and after."""
    model, manifest = pretrained.import_model("efficientnet_lite0")
    prep = Preprocessing.from_dict(manifest.preprocessing)
    rng = np.random.RandomState(0)
    images = photos.load_photos()
    names = list(images)
    samples = list(jpegs.values()) + [
        encode_jpeg(photos.random_crop(images[names[i % len(names)]], rng), quality) for i in range(crops)
    ]

    def top1(name: str) -> torch.Tensor:
        decode, prepare, to_tensor = PIPELINES[name]
        x = torch.stack([to_tensor(prep, prepare(prep, decode(prep, d))) for d in samples])
        with torch.inference_mode():
            return torch.cat([model(b).argmax(1) for b in x.split(32)])

    same = top1("before") == top1("after")
    n = len(jpegs)
    return (
        f"top-1 agreement, before vs after: {int(same[:n].sum())}/{n} whole photos, "
        f"{int(same[n:].sum())}/{len(same) - n} random crops ({float(same[n:].float().mean()):.1%})"
    )


def main(args):
    """Time both pipelines on the bundled photos as JPEGs; print the table (and the agreement if asked)."""
    torch.set_num_threads(1)
    jpegs = {name: encode_jpeg(img, args.quality) for name, img in photos.load_photos().items()}
    sizes = ", ".join(f"{n} {'x'.join(map(str, Image.open(io.BytesIO(d)).size))}" for n, d in jpegs.items())
    for name in PIPELINES:  # warm up both (imports, tables)
        time_stages(name, next(iter(jpegs.values())))
    per_photo: dict[str, list[float]] = {}
    per_round = measure(jpegs, args.rounds, per_photo)
    print(f"photos (JPEG q{args.quality}): {sizes}")
    print(f"{args.rounds} rounds, 1 thread; median ms (10th-90th percentile of the per-round medians)\n")
    print(table(per_round))
    print("\n" + photo_table(jpegs, per_photo))
    if args.normalise:
        for threads in (1, 2):
            print("\n" + compare_normalisers(jpegs, threads))
    if args.agreement:
        print("\n" + agreement(jpegs, args.agreement, args.quality))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
