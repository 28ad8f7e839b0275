"""Training, checkpoints, resume, torchrun, observability, export and evaluation."""

import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

from model_src.net import load_model
from model_src.runtime import BACKEND_FILES, Predictor
from tests.conftest import ROOT, train_run
from train import export as exportlib
from train.evaluate import evaluate


def test_checkpoint_is_a_plain_dict_that_rebuilds_its_model(checkpoint, trained):
    ckpt = torch.load(checkpoint, weights_only=True)
    for key in (
        "model",
        "model_args",
        "class_names",
        "preprocessing",
        "optimizer",
        "lr_scheduler",
        "scaler",
        "epoch",
        "best_metric",
        "args",
    ):
        assert key in ckpt, key
    assert isinstance(ckpt["args"], dict) and ckpt["class_names"] == [str(i) for i in range(10)]
    model, _ = load_model(checkpoint)
    golden = json.load(open(os.path.join(trained, "golden", "golden.json")))
    from model_src.preprocessing import Preprocessing

    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    batch = torch.stack([prep(prep.decode(os.path.join(trained, "golden", g["file"]))) for g in golden])
    with torch.inference_mode():
        pred = model(batch).argmax(1).tolist()
    acc = sum(ckpt["class_names"][p] == g["label"] for p, g in zip(pred, golden)) / len(golden)
    assert len(golden) == 100 and acc > 0.8
    metrics = json.load(open(os.path.join(trained, "metrics.json")))
    assert metrics["best_val_acc"] > 0.8 and metrics["complete"]


def test_an_existing_run_is_never_overwritten(trained):
    before = os.path.getmtime(os.path.join(trained, "checkpoint_last.pt"))
    with pytest.raises(SystemExit, match="already holds a run"):
        train_run(trained, "--epochs", 1)
    assert os.path.getmtime(os.path.join(trained, "checkpoint_last.pt")) == before


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(tmp_path, digits):
    common = ["--epochs", 3, "--deterministic", "--limit-samples", 400, "--seed", 1]
    straight = train_run(tmp_path / "straight", *common)
    train_run(tmp_path / "resumed", *common, "--stop-after-epoch", 2)
    assert torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)["epoch"] == 2
    train_run(tmp_path / "resumed", *common, "--resume", "auto")
    a = torch.load(os.path.join(straight, "checkpoint_last.pt"), weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    steps = lambda ckpt: [s["step"].item() for s in ckpt["optimizer"]["state"].values()]  # noqa: E731
    assert steps(a) == steps(b)
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"]
    hist = lambda run: [r["val_acc"] for r in json.load(open(os.path.join(run, "metrics.json")))["history"]]  # noqa: E731
    assert hist(straight) == hist(tmp_path / "resumed")


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        ["--opt", "sgd", "--lr", "0.05", "--lr-scheduler", "step", "--lr-step-size", "1"],
        ["--lr-scheduler", "plateau"],
        ["--loss", "focal", "--focal-gamma", "1.5"],
        ["--accum-steps", "2", "--clip-grad-norm", "1.0"],
        ["--amp"],
        ["--channels-last", "--activation", "relu"],
    ],
    ids=["sgd-step", "plateau", "focal", "accum-clip", "amp-bf16", "channels-last-relu"],
)
def test_recipe_flags_train(tmp_path, digits, flags):
    out = train_run(tmp_path / "run", "--epochs", 2, "--limit-samples", 300, *flags)
    ckpt = torch.load(os.path.join(out, "checkpoint_last.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["epochs"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_tensorboard_plots_and_profiler(tmp_path, digits):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.train import get_args_parser, main

    out = tmp_path / "obs"
    main(
        get_args_parser().parse_args(
            ["--output-dir", str(out), "--epochs", "2", "--limit-samples", "300", "--quiet", "--profile"]
        )
    )
    events = glob.glob(str(out / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    assert events
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"} <= scalars
    assert len(acc.Scalars("accuracy/val")) == 2
    assert any(t.startswith("params/") for t in acc.Tags()["histograms"])
    for png in ("curves.png", "confusion_matrix.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG" and min(img.size) > 100
    assert glob.glob(str(out / "profile" / "*.json*"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint_best.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    load_model(str(out / "checkpoint_best.pt"))
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["processes"] == 2 and metrics["best_val_acc"] > 0.6  # chance is 0.1
    assert sum(map(sum, metrics["confusion_matrix"])) == 359  # each val image counted exactly once across ranks
    assert proc.stdout.count("finished in") == 1  # rank 0 alone prints the summary


# --- export ---------------------------------------------------------------------------------------


def test_export_writes_every_format_within_tolerance(exported, checkpoint):
    for name in [*BACKEND_FILES.values(), "serving.json", "index_to_name.json"]:
        assert os.path.isfile(os.path.join(exported, name)), name
    model, ckpt = load_model(checkpoint)
    from model_src.preprocessing import Preprocessing

    images, labels = exportlib.load_val(ckpt["args"]["data"], Preprocessing.from_dict(ckpt["preprocessing"]))
    with torch.inference_mode():
        want = torch.softmax(model(images), 1)
    for backend, name in BACKEND_FILES.items():
        got = torch.softmax(Predictor(os.path.join(exported, name), backend)(images), 1)
        if backend == "int8":
            assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.99
        else:
            assert (got - want).abs().max() <= 1e-4, backend
    report = json.load(open(os.path.join(exported, "serving.json")))["export"]
    assert set(report["formats"]) == set(BACKEND_FILES)
    assert report["formats"]["int8"]["acc_drop"] <= 0.005


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
@pytest.mark.parametrize("batch", [1, 7])
def test_exports_take_any_batch_size(exported, backend, batch):
    pred = Predictor(os.path.join(exported, BACKEND_FILES[backend]), backend)
    assert pred(torch.randn(batch, 1, 16, 16)).shape == (batch, 10)


def test_onnx_passes_the_checker(exported):
    import onnx

    onnx.checker.check_model(onnx.load(os.path.join(exported, "model.onnx")), full_check=True)


def test_a_failed_check_writes_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(exportlib, "TOLERANCE", -1.0)  # no difference can pass
    out = tmp_path / "never"
    with pytest.raises(exportlib.ExportCheckError):
        exportlib.export_all(checkpoint, str(out), formats=("eager", "onnx"))
    assert not out.exists()
    assert not glob.glob(str(tmp_path / ".export-*"))


def test_export_refuses_an_existing_folder(checkpoint, tmp_path):
    with pytest.raises(FileExistsError):
        exportlib.export_all(checkpoint, str(tmp_path))


def test_evaluate_checkpoint_and_onnx_agree(checkpoint, exported, tmp_path):
    a = evaluate(checkpoint)
    b = evaluate(os.path.join(exported, "model.onnx"))
    assert a["accuracy"] == b["accuracy"] > 0.8
    assert a["images"] == 359 and len(a["confusion_matrix"]) == 10
    assert set(a["per_class"]["3"]) == {"precision", "recall", "support"}
    from train.evaluate import get_args_parser, main

    main(
        get_args_parser().parse_args(
            ["--model", checkpoint, "--json", str(tmp_path / "e.json"), "--confusion-png", str(tmp_path / "c.png")]
        )
    )
    assert json.load(open(tmp_path / "e.json"))["accuracy"] == a["accuracy"]
    assert (tmp_path / "c.png").stat().st_size > 1000
