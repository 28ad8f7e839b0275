"""`--backend auto` (the archive's default): the backend an archive ships, chosen by a measurement that the
archive step runs on the machine that builds it, and recorded in the archive's manifest.

A real model (an input of REAL_MODEL_SIZE px and up, EfficientNet-Lite0's 224) is exported in every CANDIDATE
this machine can run: ONNX Runtime fp32 and OpenVINO fp32, bf16 and int8. The reduced precisions must pass
export's precision gate (train/precision.py); one that fails is left out with its figures, as is one whose
runtime or CPU units are missing (bf16 without AMX or AVX-512 BF16). The survivors are timed in-process at the
archive's batch size with one worker's threads (model_src/cores.py), ROUNDS rounds that each start at another
backend, so a slow minute of a shared machine falls on all of them alike; the lowest median ms per image wins,
provided it beats backends.DEFAULT by a margin larger than this machine's noise (WIN_SHARE).
A small model (the digits) keeps backends.DEFAULT without measuring: there TorchServe's own cost per request
dwarfs the model's (docs/benchmarks.md, run A), and the quickstart does not pay for four exports.

The record (`Choice.to_dict()`, in bundle.json's archive part as `backend_choice`) says which backend won, by
which rule, every candidate's ms per image, and why each one left out was.
"""

import os
import statistics
import time
from dataclasses import asdict, dataclass, field

from model_src import backends
from model_src.cores import threads_per_worker, usable_cores, workers_of

AUTO = "auto"
REAL_MODEL_SIZE = 224  # px: from here the model's cost is the request's (EfficientNet-Lite0 at 224: 7.5 ms)
CANDIDATES = ("onnx", "openvino", "openvino-bf16", "openvino-int8")
ROUNDS = 5
# A candidate replaces backends.DEFAULT only if its median is at most this share of the default's: two runs of
# the same two fp32 files on this shared 2-core VM put OpenVINO at 1.00x and then 0.85x of ONNX Runtime, so a
# smaller lead is the machine's noise; bf16 on AMX is ~2x (issue 26) and wins by far.
WIN_SHARE = 0.8
CALLS = 10  # timed calls per backend and round, after one untimed


@dataclass
class Choice:
    """What `--backend auto` chose, and the measurement or rule that chose it."""

    backend: str
    rule: str  # "measured" or why nothing was measured
    batch: int = 1
    threads: int = 1
    ms_per_image: dict[str, float] = field(default_factory=dict)  # median over ROUNDS, per candidate timed
    left_out: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not timed
    machine: dict[str, str] = field(default_factory=dict)  # what the timing ran on (the choice holds there)

    def to_dict(self) -> dict:
        """The record as bundle.json keeps it."""
        return asdict(self)

    def summary(self) -> str:
        """One line for the archive's output."""
        if self.rule != "measured":
            return f"{self.backend} ({self.rule})"
        times = ", ".join(
            f"{name} {ms:.2f}" for name, ms in sorted(self.ms_per_image.items(), key=lambda i: i[1])
        )
        out = "; ".join(f"{name}: {why.split(':')[0]}" for name, why in self.left_out.items())
        return f"{self.backend} at batch {self.batch}, {self.threads} thread(s) (ms/image: {times})" + (
            f"; left out: {out}" if out else ""
        )


def is_real(preprocessing: dict) -> bool:
    """True for a model whose input is REAL_MODEL_SIZE px or more: the ones `auto` measures."""
    return int(preprocessing.get("image_size") or 0) >= REAL_MODEL_SIZE


def candidates() -> tuple[list[str], dict[str, str]]:
    """The CANDIDATES usable here, and why each other one is not (a missing package, no bf16 units)."""
    usable, left_out = [], {}
    for name in CANDIDATES:
        if why := backends.get(name).available():
            left_out[name] = why
        else:
            usable.append(name)
    return usable, left_out


def worker_threads(model_config: dict) -> int:
    """The threads one worker of an archive with `model_config` gives its runtime on this machine: the
    handler's `threads`, or (0, its default) its share of the cores, as the handler's auto_threads has it."""
    cores = usable_cores()
    fixed = int((model_config.get("handler") or {}).get("threads") or 0)
    return fixed or threads_per_worker(workers_of(model_config, cores), cores)


def time_backends(files: dict[str, str], shape: tuple, batch: int, threads: int) -> dict[str, float]:
    """Median ms per image of each backend's file (name -> path) called on a (batch, *shape) input."""
    import torch

    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    loaded = {name: backends.load(path, name, "cpu", threads) for name, path in files.items()}
    samples: dict[str, list[float]] = {name: [] for name in loaded}
    names = list(loaded)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for r in range(ROUNDS):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    predict = loaded[name]
                    predict(x)
                    start = time.perf_counter()
                    for _ in range(CALLS):
                        predict(x)
                    samples[name].append((time.perf_counter() - start) / CALLS / batch * 1000)
    finally:
        torch.set_num_threads(previous)
    return {name: round(statistics.median(ms), 3) for name, ms in samples.items()}


def choose(files: dict[str, str], left_out: dict[str, str], shape: tuple, batch: int, threads: int) -> Choice:
    """Time the candidates whose files passed export (`files`: name -> path) with `threads` threads and pick
    the fastest."""
    if not files:
        raise ValueError(f"--backend auto: no candidate passed export here ({left_out})")
    ms = time_backends(files, shape, batch, threads)
    best = min(ms, key=ms.__getitem__)
    default = ms.get(backends.DEFAULT)
    if default is not None and ms[best] > WIN_SHARE * default:
        best = backends.DEFAULT  # within the noise of the default: keep it
    return Choice(best, "measured", batch, threads, ms, left_out, machine())


def machine() -> dict[str, str]:
    """The CPU, its matrix and vector units that matter here, and the runtimes' versions."""
    from importlib.metadata import PackageNotFoundError, version

    cpu, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                cpu = cpu or (value.strip() if key.strip() == "model name" else "")
                if key.strip() == "flags":
                    flags = value.split()
                    break
    except OSError:
        pass
    units = [f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512_vnni", "avx512f")]
    found = {"cpu": cpu, "units": " ".join(units), "cores": str(usable_cores())}
    for package in ("onnxruntime", "openvino", "nncf"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def fixed(reason: str) -> Choice:
    """The choice for a model `auto` does not measure: backends.DEFAULT, and why."""
    return Choice(backends.DEFAULT, reason)


def export_plan(preprocessing: dict) -> tuple[list[str], frozenset[str]]:
    """What archive_checkpoint exports for `auto`: the formats, and those (the candidates) that may be left
    out when they fail their check. The eager weights always go too: explanations of a backend without
    gradients run on them."""
    if not is_real(preprocessing):
        return [backends.DEFAULT, backends.reference().name], frozenset()
    usable, left_out = candidates()
    for name, why in left_out.items():
        print(f"archive: {name} left out: {why}")
    return [*usable, backends.reference().name], frozenset(usable)


def checked(bundle, name: str) -> str | None:
    """None if the export folder's manifest says `name` passed its check there, else why it may not be timed
    (a folder made by hand, merged from two exports, or listing a refused file)."""
    checks = bundle.checks or {}
    if name in checks.get("refused", {}):
        return checks["refused"][name]
    entry = checks.get("formats", {}).get(name)
    if not entry:
        return "the export folder's manifest has no check of it"
    if not backends.get(name).exact and not entry.get("passed"):
        return "the export folder's manifest does not say it passed the precision gate"
    return None


def resolve(export_dir: str, bundle, model_config: dict, batch_size: int | None) -> Choice:
    """`auto` for the export folder `export_dir` (its manifest `bundle`): the rule for a small model, else
    the fastest of the candidates the folder holds and its manifest says passed their checks, timed as the
    archive's workers will run them (model-config.yaml's workers, handler threads and batch size)."""
    from model_src.preprocessing import Preprocessing

    if not is_real(bundle.preprocessing):
        return fixed(f"a {bundle.preprocessing.get('image_size')} px model: not measured, the default")
    _, left_out = candidates()
    for name in CANDIDATES:
        if name in left_out:
            continue
        refused = (bundle.checks or {}).get("refused", {}).get(name)
        if refused or name not in bundle.files:
            left_out[name] = refused or "not in the export folder"
        elif why := checked(bundle, name):
            left_out[name] = why
    present = {n: os.path.join(export_dir, bundle.files[n]) for n in CANDIDATES if n not in left_out}
    prep = Preprocessing.from_dict(bundle.preprocessing)
    shape = (prep.channels, prep.image_size, prep.image_size)
    batch = int(batch_size or model_config.get("batchSize") or 1)
    return choose(present, left_out, shape, batch, worker_threads(model_config))
