"""Training (train/train.py): checkpoint contents, no overwrite, exact resume, recipe flags,
TensorBoard/plots/profiler and torchrun DDP on CPU. Export and evaluation: tests/test_export.py."""

import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Subset, TensorDataset

from model_src.layers import Swish
from model_src.manifest import Manifest
from model_src.net import load_model
from model_src.preprocessing import Preprocessing
from tests import images
from tests.conftest import ROOT, cannot_run, free_port, train_run
from tests.reference import torchvision_eval
from train import data as datalib
from train import train as trainer
from train.data import CachedImages, DataError, build_datasets, build_loaders

CHECKPOINT_KEYS = {"model", "manifest", "optimizer", "lr_scheduler", "scaler", "epoch", "args"}
N_VAL = 359  # digits validation images (20% of 1,797, stratified)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# --- the trained run ------------------------------------------------------------------------------


def test_checkpoint_is_a_plain_dict_with_the_agreed_keys(checkpoint):
    ckpt = load_ckpt(checkpoint)  # weights_only: no pickled classes (argparse.Namespace, dataclasses)
    assert CHECKPOINT_KEYS <= set(ckpt)
    assert type(ckpt["args"]) is dict and ckpt["args"]["epochs"] == 3
    json.dumps(ckpt["args"])  # plain values only
    known = Manifest.from_checkpoint(ckpt)  # training's part of the bundle manifest, in plain values
    assert json.loads(json.dumps(ckpt["manifest"])) == ckpt["manifest"] == known.to_dict()
    assert known.class_names == [str(i) for i in range(10)]
    assert known.model_args["num_classes"] == 10 and known.model_args["in_channels"] == 1
    assert "weights" not in known.model_args
    assert Preprocessing.from_dict(known.preprocessing).channels == 1
    metrics = known.provenance.metrics
    assert 1 <= ckpt["epoch"] <= 3 and metrics.best_epoch == metrics.epochs_done == ckpt["epoch"]
    assert metrics.best_val_acc == metrics.final_val_acc > 0.8  # checkpoint_best: its epoch was the best
    assert known.provenance.command.startswith("python -m train.train --output-dir ")  # as typed: sys.argv
    assert known.provenance.data == os.path.abspath(datalib.DIGITS_DIR)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["optimizer"]["state"] and ckpt["lr_scheduler"]


def test_checkpoint_rebuilds_its_model_and_classifies_the_golden_set(checkpoint, trained):
    model, ckpt = load_model(checkpoint)
    assert not model.training
    golden = read_json(os.path.join(trained, "golden", "golden.json"))
    known = Manifest.from_checkpoint(ckpt)
    assert len(golden) == 100 and {g["label"] for g in golden} == set(known.class_names)
    prep = Preprocessing.from_dict(known.preprocessing)
    batch = torch.stack([prep(prep.decode(os.path.join(trained, "golden", g["file"]))) for g in golden])
    with torch.inference_mode():
        pred = model(batch).argmax(1).tolist()
    acc = sum(known.class_names[p] == g["label"] for p, g in zip(pred, golden)) / len(golden)
    assert acc > 0.8


def test_metrics_json(trained):
    metrics = read_json(os.path.join(trained, "metrics.json"))
    assert metrics["best_val_acc"] > 0.8 and metrics["complete"] and metrics["processes"] == 1
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    assert metrics["best_val_acc"] == max(r["val_acc"] for r in metrics["history"])
    assert sum(map(sum, metrics["confusion_matrix"])) == N_VAL
    assert os.path.isfile(os.path.join(trained, "checkpoint_last.pt"))
    assert load_ckpt(os.path.join(trained, "checkpoint_last.pt"))["epoch"] == 3


def test_an_existing_run_is_never_overwritten(trained):
    last = os.path.join(trained, "checkpoint_last.pt")
    before = os.path.getmtime(last)
    with pytest.raises(SystemExit, match="already holds a run"):
        train_run(trained, "--epochs", 1)
    assert os.path.getmtime(last) == before


# --- resume ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])  # 1: augmentation runs in worker processes
def test_resume_reproduces_an_uninterrupted_run(tmp_path, digits, workers):
    common = ["--epochs", 3, "--deterministic", "--limit-samples", 400, "--seed", 1, "--workers", workers]
    straight = train_run(tmp_path / "straight", *common)
    resumed = tmp_path / "resumed"
    train_run(resumed, *common, "--stop-after-epoch", 2)
    stopped = load_ckpt(resumed / "checkpoint_last.pt")
    assert stopped["epoch"] == 2 and not read_json(resumed / "metrics.json")["complete"]
    train_run(resumed, *common, "--resume", "auto")

    a = load_ckpt(os.path.join(straight, "checkpoint_last.pt"))
    b = load_ckpt(resumed / "checkpoint_last.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    steps = lambda ckpt: [s["step"].item() for s in ckpt["optimizer"]["state"].values()]  # noqa: E731
    assert steps(a) == steps(b) and steps(b)[0] > steps(stopped)[0]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"] == 3
    history = lambda run: [r["val_acc"] for r in read_json(os.path.join(run, "metrics.json"))["history"]]  # noqa: E731
    assert len(history(straight)) == 3 and history(straight) == history(resumed)
    assert read_json(resumed / "metrics.json")["complete"]


def small_digits(digits, root, per_class=2):
    """Another ImageFolder with the digits' classes: `per_class` images a class in train/ and val/."""
    for c in range(10):
        for split in ("train", "val"):
            (root / split / str(c)).mkdir(parents=True)
            for path in sorted(glob.glob(os.path.join(digits, "val", str(c), "*.png")))[:per_class]:
                shutil.copy(path, root / split / str(c))
    return root


def test_resume_continues_on_the_data_it_was_trained_on(trained, digits, tmp_path):
    other = small_digits(digits, tmp_path / "other")
    run = tmp_path / "run"
    run.mkdir()
    ckpt = load_ckpt(os.path.join(trained, "checkpoint_last.pt"))
    ckpt["manifest"]["provenance"]["data"] = str(other)  # as if trained with --data <other>
    torch.save(ckpt, run / "checkpoint_last.pt")
    train_run(run, "--resume", "auto", "--epochs", 4)  # no --data: <other>, not the digits default
    metrics = read_json(run / "metrics.json")
    assert metrics["epochs_done"] == 4 and sum(map(sum, metrics["confusion_matrix"])) == 20  # <other>'s val
    assert load_ckpt(run / "checkpoint_last.pt")["args"]["data"] == str(other)


def test_resume_refuses_data_with_other_classes(trained, tmp_path):
    pets = tmp_path / "pets"
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (pets / split / name).mkdir(parents=True)
            images.digit_like().save(pets / split / name / "0.png")
    with pytest.raises(SystemExit, match=r"has classes \['cat', 'dog'\], but .* was trained on \['0', '1'"):
        train_run(tmp_path / "run", "--resume", os.path.join(trained, "checkpoint_last.pt"), "--data", pets)
    assert not glob.glob(str(tmp_path / "run" / "*.pt"))


def test_resume_refuses_to_write_into_another_run(trained, tmp_path):
    run = tmp_path / "run"  # a run of its own
    run.mkdir()
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        shutil.copy(os.path.join(trained, name), run / name)
    before = {p: os.path.getmtime(p) for p in glob.glob(str(run / "*.pt"))}
    for resume in (os.path.join(trained, "checkpoint_last.pt"), str(run / "checkpoint_best.pt")):
        with pytest.raises(SystemExit, match="already holds a run"):
            train_run(run, "--resume", resume, "--epochs", 4)
    assert {p: os.path.getmtime(p) for p in glob.glob(str(run / "*.pt"))} == before


# --- data -----------------------------------------------------------------------------------------


def test_each_rank_trains_on_its_share_of_the_batches():
    train = TensorDataset(torch.zeros(100, 1), torch.zeros(100, dtype=torch.long))
    loader, _, sampler = build_loaders(train, train, batch_size=64, workers=0, rank=0, world=2)
    assert len(sampler) == 50 and len(loader) == 1 and sum(len(y) for _, y in loader) == 50
    loader, _, _ = build_loaders(train, train, batch_size=64, workers=0, rank=0, world=1)
    assert len(loader) == 1  # 100 > 64: the ragged last batch is dropped
    with pytest.raises(DataError, match="no training batch"):
        build_loaders(Subset(train, []), train, batch_size=64, workers=0, rank=0, world=2)


def test_the_cache_holds_prepared_images_filled_before_workers_start(tmp_path, monkeypatch):
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            images.digit_like(size=300, mode="RGB").save(tmp_path / split / name / "0.jpg", quality=90)
    prep = Preprocessing(image_size=32, resize_size=36, channels=3, mean=[0.5] * 3, std=[0.25] * 3)
    train, val = build_datasets(str(tmp_path), prep, "crop-flip")
    train_loader, val_loader, _ = build_loaders(train, val, batch_size=4, workers=1, rank=0, world=1)
    for ds in (train, val):  # filled here, in the main process, with the prepared images only
        assert sorted(ds.cache) == [0, 1]
        assert all(img.size == (32, 32) and img.mode == "RGB" for img, _ in ds.cache.values())
    uncached = CachedImages(str(tmp_path / "val"), prep, prep, cache=False)
    assert all(torch.equal(val[i][0], uncached[i][0]) for i in range(2))  # still prep(decoded image)
    assert next(iter(train_loader))[0].shape == next(iter(val_loader))[0].shape == (2, 3, 32, 32)
    monkeypatch.setattr(datalib, "CACHE_BYTES", 4 * 32 * 32 * 4 - 1)  # 4 RGB images need one byte more
    assert all(ds.cache is None for ds in build_datasets(str(tmp_path), prep, "crop-flip"))


def test_gifs_are_training_images(tmp_path):
    for name, fmt in (("gif/0.gif", "GIF"), ("png/0.png", "PNG")):
        (tmp_path / name).parent.mkdir()
        images.digit_like().save(tmp_path / name, fmt)
    prep = Preprocessing()
    ds = CachedImages(str(tmp_path), prep, prep, cache=False)
    assert ds.classes == ["gif", "png"] and len(ds) == 2
    # the handler's
    assert torch.equal(ds[0][0], prep(prep.decode((tmp_path / "gif" / "0.gif").read_bytes())))
    # independent
    assert torch.equal(ds[0][0], torchvision_eval(prep, Image.open(tmp_path / "gif" / "0.gif")))
    assert [label for _, label in datalib.golden_set(str(tmp_path))] == ["gif", "png"]


# --- recipe flags ---------------------------------------------------------------------------------

FLAGS = {
    "sgd-step": "--opt sgd --lr 0.05 --lr-scheduler step --lr-step-size 1 --lr-warmup-epochs 0",
    "plateau": "--lr-scheduler plateau",
    "focal": "--loss focal --focal-gamma 1.5",
    "accum-clip": "--accum-steps 2 --clip-grad-norm 1.0",
    "amp-bf16": "--amp --limit-samples 120",  # bf16 convolutions are slow on CPUs without AMX
    "channels-last": "--channels-last",
    "relu": "--activation relu",
}


def watch_training(monkeypatch) -> dict:
    """What a training run really does, seen from outside train.py: each training forward's output dtype and
    whether the convolutions' weights are channels_last, each loss with its inputs, each gradient clipping
    with the norm it left."""
    seen: dict[str, list] = {"forward": [], "losses": [], "clips": []}
    real_model, real_criterion, real_clip = (
        trainer.build_model,
        trainer.build_criterion,
        nn.utils.clip_grad_norm_,
    )

    def build_model(model_args):
        model = real_model(model_args)

        def forward_hook(module, inputs, output):
            if module.training:
                # one input channel or a 1x1 kernel lays out the same either way: only the others tell
                convs = [
                    p for p in module.parameters() if p.ndim == 4 and p.shape[1] > 1 and p[0, 0].numel() > 1
                ]
                last = all(
                    p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                    for p in convs
                )
                seen["forward"].append((output.dtype, last))

        model.register_forward_hook(forward_hook)
        return model

    def build_criterion(*args):
        criterion = real_criterion(*args)
        criterion.register_forward_hook(lambda m, inputs, out: seen["losses"].append((*inputs, out.detach())))
        return criterion

    def clip(params, max_norm, *args, **kwargs):
        params = list(params)
        total = real_clip(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        seen["clips"].append((max_norm, after.item()))
        return total

    monkeypatch.setattr(trainer, "build_model", build_model)
    monkeypatch.setattr(trainer, "build_criterion", build_criterion)
    monkeypatch.setattr(nn.utils, "clip_grad_norm_", clip)
    return seen


def focal_reference(logits, targets, gamma):
    """Focal loss from its formula, mean of -(1 - p_t)^gamma * log(p_t) (Lin et al. 2017), not
    train.losses."""
    log_pt = torch.log_softmax(logits.float(), 1).gather(1, targets[:, None])[:, 0]
    return (-((1 - log_pt.exp()) ** gamma) * log_pt).mean()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FLAGS))
def test_recipe_flags_train(tmp_path, digits, name, monkeypatch):
    seen = watch_training(monkeypatch)
    out = train_run(tmp_path / "run", "--epochs", 1, "--limit-samples", 300, *FLAGS[name].split())
    ckpt = load_ckpt(os.path.join(out, "checkpoint_last.pt"))
    # Each flag shows in what training did (and the others are the controls that it does not show there).
    steps = len(seen["forward"])  # training batches
    assert steps >= 2 and {dtype for dtype, _ in seen["forward"]} == {
        torch.bfloat16 if name == "amp-bf16" else torch.float32
    }
    assert {last for _, last in seen["forward"]} == {name == "channels-last"}
    smoothing = ckpt["args"]["label_smoothing"]  # cross-entropy's default is smoothed; focal ignores it
    for logits, targets, loss in seen["losses"]:
        if name == "focal":
            want = focal_reference(logits, targets, 1.5)
        else:
            want = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    if name == "accum-clip":  # one optimizer step (and one clipping) per two batches
        assert len(seen["clips"]) == math.ceil(steps / 2)
        assert all(max_norm == 1.0 and after <= 1.0 + 1e-4 for max_norm, after in seen["clips"]), seen[
            "clips"
        ]
    else:
        assert seen["clips"] == []
    if "exp_avg" in next(iter(ckpt["optimizer"]["state"].values())):  # AdamW counts its steps
        adam_steps = next(iter(ckpt["optimizer"]["state"].values()))["step"]
        assert adam_steps == (math.ceil(steps / 2) if name == "accum-clip" else steps)
    assert ckpt["epoch"] == 1 and ckpt["args"]["epochs"] == 1
    for key, value in ckpt["model"].items():
        if value.is_floating_point():
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
    model, _ = load_model(os.path.join(out, "checkpoint_last.pt"))
    with torch.inference_mode():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)

    opt, sched = ckpt["optimizer"], ckpt["lr_scheduler"]
    if name == "sgd-step":
        assert opt["param_groups"][0]["nesterov"] and "momentum_buffer" in next(iter(opt["state"].values()))
        assert opt["param_groups"][0]["lr"] == pytest.approx(0.005)  # stepped once: 0.05 * 0.1
    elif name == "plateau":
        assert (
            sched["mode"] == "max"
            and sched["best"] == read_json(os.path.join(out, "metrics.json"))["best_val_acc"]
        )
    elif name == "relu":
        assert Manifest.from_checkpoint(ckpt).model_args["activation"] == "relu"
        assert not any(isinstance(m, Swish) for m in model.modules())
    else:
        assert "exp_avg" in next(iter(opt["state"].values()))  # the default AdamW


# --- observability --------------------------------------------------------------------------------


@pytest.mark.slow
def test_tensorboard_plots_and_profiler(tmp_path, digits):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.train import get_args_parser, main

    out = tmp_path / "obs"
    args = ["--output-dir", str(out), "--epochs", "2", "--limit-samples", "300", "--quiet", "--profile"]
    main(get_args_parser().parse_args(args))  # without --no-tensorboard and --no-plots

    assert glob.glob(str(out / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"} <= scalars
    assert [e.step for e in acc.Scalars("accuracy/val")] == [1, 2]
    history = read_json(out / "metrics.json")["history"]
    assert [e.value for e in acc.Scalars("accuracy/val")] == pytest.approx([r["val_acc"] for r in history])
    assert any(t.startswith("params/") for t in acc.Tags()["histograms"])
    for png in ("curves.png", "confusion_matrix.png"):
        with Image.open(out / png) as img:
            img.verify()
        with Image.open(out / png) as img:
            assert img.format == "PNG" and min(img.size) > 100
    traces = glob.glob(str(out / "profile" / "*.json*"))
    assert traces and all(os.path.getsize(t) > 1000 for t in traces)


# --- torchrun -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path, digits):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "train.train",
        "--output-dir",
        str(out),
        "--epochs",
        "4",
        "--quiet",
        "--no-tensorboard",
        "--no-plots",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_ckpt(out / "checkpoint_best.pt")
    assert not any(k.startswith("module.") for k in ckpt["model"])
    model, _ = load_model(str(out / "checkpoint_best.pt"))
    metrics = read_json(out / "metrics.json")
    assert metrics["processes"] == 2 and metrics["best_val_acc"] > 0.6  # chance is 0.1
    assert sum(map(sum, metrics["confusion_matrix"])) == N_VAL  # each val image counted once across ranks
    assert proc.stdout.count("finished in") == 1  # rank 0 alone prints the summary


# --- faults: a run killed at any point can be finished, and no two runs share a folder ----------------------


@pytest.fixture
def tiny(digits, tmp_path):
    """Flags of a one-epoch run on 3 digits a class (a second or two)."""
    return ("--epochs", 1, "--data", small_digits(digits, tmp_path / "data", per_class=3))


def test_a_run_killed_while_writing_its_reports_is_finished_by_resume(tiny, tmp_path, monkeypatch, capsys):
    from train import report

    dump = json.dump

    def torn_dump(obj, f, **kwargs):  # metrics.json half-written when the run dies
        if "best_val_acc" not in obj:
            return dump(obj, f, **kwargs)
        f.write('{"best_val_acc": ')
        raise KeyboardInterrupt("killed while writing metrics.json")

    monkeypatch.setattr(report.json, "dump", torn_dump)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_run(run, *tiny)
    monkeypatch.undo()
    assert load_ckpt(run / "checkpoint_last.pt")["epoch"] == 1  # died after its last checkpoint
    assert len(read_json(run / "golden" / "golden.json")) == 30  # written at the start
    assert not (run / "metrics.json").exists()  # no torn file: none at all
    with pytest.raises(SystemExit, match="already holds a run"):
        train_run(run, *tiny)
    capsys.readouterr()

    train_run(run, *tiny, "--resume", "auto")  # no epoch left: it writes the missing reports
    assert "finished in" in capsys.readouterr().out
    metrics = read_json(run / "metrics.json")
    assert metrics["complete"] and metrics["epochs_done"] == 1
    # the last epoch's model, evaluated again
    assert metrics["final_val_acc"] == metrics["history"][-1]["val_acc"]
    assert sorted(os.listdir(run)) == [
        "checkpoint_best.pt",
        "checkpoint_last.pt",
        "golden",
        "metrics.json",
        "run.lock",
    ]


def test_a_missing_weights_file_is_refused_before_the_run_folder_is_made(tiny, tmp_path):
    """docs/training.md's `--arch resnet18 --weights ~/resnet18-f37072fd.pth` without that file (was: a
    FileNotFoundError traceback, and runs/pets/ left behind with run.lock and golden/)."""
    with pytest.raises(SystemExit, match=r"--weights .*missing\.pth: no such file"):
        train_run(
            tmp_path / "runs" / "pets", *tiny, "--arch", "resnet18", "--weights", tmp_path / "missing.pth"
        )
    assert not (tmp_path / "runs").exists()


def test_a_run_names_the_venv_tensorboard(tiny, tmp_path, capsys):
    """The run's closing line shows a TensorBoard command that works without the venv active (was: a bare
    `tensorboard`, not on PATH)."""
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--quiet", "--no-plots", *map(str, tiny)]  # TensorBoard on
    trainer.main(trainer.get_args_parser().parse_args(argv))
    assert f"tb/ (.venv/bin/tensorboard --logdir {out}/tb)" in capsys.readouterr().out
    assert os.access(os.path.join(ROOT, ".venv", "bin", "tensorboard"), os.X_OK)


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(tiny, tmp_path, monkeypatch):
    import train.train as trainer

    run, refusals = tmp_path / "run", []
    first_epoch = trainer.train_one_epoch

    def epoch_with_a_rival(*args, **kwargs):  # the second run starts while the first trains its first epoch
        monkeypatch.setattr(trainer, "train_one_epoch", first_epoch)
        try:
            train_run(run, *tiny, "--seed", 7)
        except SystemExit as e:
            refusals.append(str(e))
        return first_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", epoch_with_a_rival)
    train_run(run, *tiny)
    assert len(refusals) == 1, "the second run was not refused"
    assert f"in use by another training run (pid {os.getpid()}" in refusals[0]
    # the first run's model, not the rival's
    assert load_ckpt(run / "checkpoint_last.pt")["args"]["seed"] == 0
    train_run(run, *tiny, "--resume", "auto")  # the lock went with the run that held it


def test_best_is_saved_before_last(tiny, tmp_path, monkeypatch):
    from train import checkpoint

    save, saved = checkpoint.save_checkpoint, []

    def save_then_die(state, path):  # killed between the two saves of epoch 1 (always a best)
        if saved:
            raise KeyboardInterrupt("killed between the two checkpoint saves")
        save(state, path)
        saved.append(os.path.basename(path))

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_run(run, *tiny)
    monkeypatch.undo()
    assert saved == ["checkpoint_best.pt"], f"saved {saved} first"
    train_run(run, *tiny)  # no last checkpoint: the run starts again and writes both
    last, best = load_ckpt(run / "checkpoint_last.pt"), load_ckpt(run / "checkpoint_best.pt")
    assert Manifest.from_checkpoint(last).provenance.metrics.best_epoch == best["epoch"] == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        cannot_run("needs root to mount a tmpfs")
    yield disk
    # lazy: a failed save may still hold a file open
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_a_checkpoint_that_does_not_fit_names_the_path_and_the_free_space(small_disk):
    from train.checkpoint import save_checkpoint

    path = small_disk / "checkpoint_last.pt"
    with pytest.raises(
        RuntimeError, match=rf"cannot write checkpoint {path}: 0\.\d MiB free on {small_disk}"
    ):
        save_checkpoint({"model": {"w": torch.zeros(1 << 20)}}, str(path))  # 4 MiB
    assert os.listdir(small_disk) == []  # no half-written checkpoint or temporary file
