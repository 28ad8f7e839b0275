"""Mobile formats (train/mobile.py through train.export): .ptl for the lite interpreter and .pte for
ExecuTorch, each loaded back by its own runtime and compared with eager on real images, for the digits model
and the pretrained EfficientNet-Lite0; the phone's preprocessing.json; refusals that write nothing; setup.sh
--mobile.

ExecuTorch is optional (scripts/setup.sh --mobile; scripts/test.sh installs it): without it the .pte tests are
skipped with that reason and the rest run."""

import glob
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from model_src import backends, manifest
from model_src.manifest import Manifest
from model_src.net import fuse_for_export, load_model
from model_src.preprocessing import Preprocessing
from tests.reference import assert_within_one_grey
from tests.test_export import val_batch  # noqa: F401  (a fixture: the eager model on every validation image)
from tests.test_tools import fake_repo, run_script
from tests.test_training import N_VAL, read_json
from train import export as exportlib
from train import mobile, photos

HAVE_EXECUTORCH = importlib.util.find_spec("executorch") is not None
needs_executorch = pytest.mark.skipif(
    not HAVE_EXECUTORCH,
    reason="ExecuTorch is optional and not installed here: scripts/setup.sh --mobile installs it",
)
MOBILE = ("ptl", "pte") if HAVE_EXECUTORCH else ("ptl",)
LITE0 = "efficientnet_lite0"
pytestmark = [  # ExecuTorch 1.5.1's own import-time warnings, not this bundle's
    pytest.mark.filterwarnings(r"ignore:.* is deprecated. Use files\(\) instead:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:This API is experimental"),
]


@pytest.fixture(scope="module")
def mobile_export(checkpoint, tmp_path_factory):
    """The digits model as model.pt and every mobile format this environment can make, checked by
    export_all."""
    out = str(tmp_path_factory.mktemp("mobile") / "export")
    return out, exportlib.export_all(checkpoint, out, formats=("eager", *MOBILE))


# --- the digits model -----------------------------------------------------------------------------


@pytest.mark.slow  # the export behind mobile_export: a training run and an XNNPACK lowering (~30 s idle)
def test_mobile_formats_are_written_with_their_checks_and_the_phone_json(mobile_export, checkpoint):
    out, report = mobile_export
    files = [backends.get(f).file for f in ("eager", *MOBILE)]
    assert sorted(os.listdir(out)) == sorted([*files, manifest.FILE, mobile.PHONE_JSON])
    assert manifest.read(out).checks["formats"] == report["formats"]
    for fmt in MOBILE:
        entry = report["formats"][fmt]
        assert entry["file"] == backends.get(fmt).file
        assert entry["bytes"] == os.path.getsize(os.path.join(out, entry["file"])) > 100_000
        assert entry["max_diff"] <= 1e-4 and entry["max_diff_batch1"] <= 1e-4 and entry["export_s"] > 0
    print(json.dumps(report["formats"], indent=1))
    assert not glob.glob(os.path.join(os.path.dirname(out), ".export-*"))


def test_server_exports_stay_the_default():
    assert set(exportlib.SERVER_FORMATS) == {"eager", "torchscript", "onnx", "int8"}
    assert not {"ptl", "pte"} & set(backends.served())  # the phone formats are not served
    assert exportlib.get_args_parser().parse_args(
        ["--checkpoint", "c", "--output-dir", "o"]
    ).formats == ",".join(exportlib.SERVER_FORMATS)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["ptl", pytest.param("pte", marks=needs_executorch)])
def test_each_runtime_matches_eager_on_every_validation_image(mobile_export, val_batch, fmt):  # noqa: F811
    _, images, labels, want = val_batch
    pred = backends.load(os.path.join(mobile_export[0], backends.get(fmt).file), fmt)
    got = torch.softmax(pred(images), 1)
    assert got.shape == want.shape == (N_VAL, 10)
    assert (got - want).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(1), want.argmax(1))


@pytest.mark.slow
def test_evaluate_reads_the_mobile_files_and_gets_the_checkpoints_accuracy(mobile_export, checkpoint):
    from train.evaluate import evaluate

    want = evaluate(checkpoint)
    for fmt in MOBILE:
        got = evaluate(os.path.join(mobile_export[0], backends.get(fmt).file))  # bundle.json beside it
        assert got["images"] == N_VAL and got["confusion_matrix"] == want["confusion_matrix"], fmt


@pytest.mark.slow
def test_the_lite_interpreter_needs_no_torch_jit_load(mobile_export):
    """A phone has only the lite interpreter: the file carries its bytecode, not TorchScript alone."""
    import zipfile

    with zipfile.ZipFile(os.path.join(mobile_export[0], "model.ptl")) as z:
        assert any(name.endswith("bytecode.pkl") for name in z.namelist())


@pytest.mark.slow
@needs_executorch
def test_the_pte_program_takes_one_image_in_the_phone_json_layout(mobile_export):
    from executorch.runtime import Runtime

    out = mobile_export[0]
    phone = read_json(os.path.join(out, mobile.PHONE_JSON))
    method = Runtime.get().load_program(os.path.join(out, "model.pte")).load_method("forward")
    # MethodMeta(... input_tensor_meta=['TensorInfo(sizes=[1, 1, 16, 16], dtype=Float
    meta = str(method.metadata)
    assert phone["input_shape"] == [1, 1, 16, 16] and phone["dtype"] == "float32"
    assert "sizes=[1, 1, 16, 16], dtype=Float" in meta and "sizes=[1, 10], dtype=Float" in meta
    with pytest.raises(RuntimeError):  # ExecuTorch's pybindings raise RuntimeError for an input it refuses
        method.execute([torch.zeros(2, 1, 16, 16)])  # a batch is refused, not silently cut
    (one,) = method.execute([torch.zeros(1, 1, 16, 16)])  # the control: one image runs
    assert one.shape == (1, 10)


# --- the phone's preprocessing --------------------------------------------------------------------


def phone_input(img: Image.Image, phone: dict) -> torch.Tensor:
    """What an app does, written from preprocessing.json alone (Pillow stands in for the phone's bitmap
    calls)."""
    img = img.convert("L" if phone["channel_order"].startswith("L") else "RGB")
    size = phone["image_size"]
    if phone["resize_size"] is None:
        img = img.resize((size, size), Image.BILINEAR)
    else:
        scale = phone["resize_size"] / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32).reshape(size, size, -1) / 255.0
    arr = (arr - np.float32(phone["mean"])) / np.float32(phone["std"])
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).reshape(phone["input_shape"])


@pytest.mark.slow
def test_the_phone_json_reproduces_the_digits_input(mobile_export, checkpoint, png):
    phone = read_json(os.path.join(mobile_export[0], mobile.PHONE_JSON))
    prep = Preprocessing.from_dict(
        Manifest.from_checkpoint(torch.load(checkpoint, weights_only=True)).preprocessing
    )
    assert {
        k: phone[k] for k in prep.to_dict()
    } == prep.to_dict()  # the checkpoint's own values, not re-typed
    assert phone["class_names"] == [str(i) for i in range(10)]
    img = prep.decode(png)
    assert torch.allclose(phone_input(img, phone), prep(img)[None], atol=1e-6)


def test_the_phone_json_reproduces_an_rgb_centre_crop():
    prep = Preprocessing(
        image_size=224, resize_size=256, channels=3, mean=[0.485, 0.456, 0.406], std=[0.229] * 3
    )
    phone = mobile.phone_preprocessing(prep, ["a", "b"])
    assert phone["input_shape"] == [1, 3, 224, 224] and phone["channel_order"] == "RGB"
    assert "shorter side is 256" in " ".join(phone["steps"]) and "centre 224x224" in " ".join(phone["steps"])
    img = photos.load_photos()["chelsea"]  # 451 x 300: a real resize and crop
    assert_within_one_grey(
        phone_input(img, phone), prep(img)[None], prep, atol=1e-5
    )  # crop resampled in one pass


# --- refusals -------------------------------------------------------------------------------------


def test_pte_without_executorch_names_the_setup_flag(checkpoint, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a)
    )
    out = tmp_path / "never"
    with pytest.raises(
        backends.BackendUnavailable, match=r"needs ExecuTorch.*run scripts/setup\.sh --mobile"
    ):
        exportlib.export_all(checkpoint, str(out), formats=("eager", "pte"))
    args = ["--checkpoint", checkpoint, "--output-dir", str(out), "--formats", "ptl,pte"]
    with pytest.raises(SystemExit, match="export failed, nothing written: .*scripts/setup.sh --mobile"):
        exportlib.main(exportlib.get_args_parser().parse_args(args))
    assert os.listdir(tmp_path) == []


class WithMedian(nn.Module):
    """The model plus 0 x a per-image median: the same logits, and an operator outside ExecuTorch's opset."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) + 0 * x.flatten(1).median(dim=1).values[:, None]


@pytest.mark.slow
@needs_executorch
def test_an_operator_executorch_cannot_lower_is_named_and_nothing_is_written(
    checkpoint, tmp_path, monkeypatch
):
    monkeypatch.setattr(exportlib, "fuse_for_export", lambda model: WithMedian(fuse_for_export(model)))
    out = tmp_path / "never"
    with pytest.raises(backends.ExportError, match=r"cannot lower operator aten\.median\.dim") as e:
        # eager and ptl pass first
        exportlib.export_all(checkpoint, str(out), formats=("eager", "ptl", "pte"))
    print(e.value)
    assert os.listdir(tmp_path) == []  # neither the folder nor its temporary one


# --- EfficientNet-Lite0 with its published weights ------------------------------------------------


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    from train import pretrained

    path = str(tmp_path_factory.mktemp("lite0") / "checkpoint.pt")
    pretrained.main(pretrained.get_args_parser().parse_args(["--arch", LITE0, "--output", path]))
    return path


@pytest.mark.slow  # the XNNPACK lowering of a 4.7 M-parameter network: ~1 min idle, several on a busy machine
def test_efficientnet_lite0_mobile_formats_agree_with_eager_on_real_photos(lite0, tmp_path):
    data = photos.write_photo_crops(str(tmp_path / "crops"), per_photo=4)  # 7 photos x 4 crops
    out = str(tmp_path / "export")
    report = exportlib.export_all(lite0, out, formats=("eager", *MOBILE), data=data, batch=16)
    print(json.dumps(report["formats"], indent=1))
    phone = read_json(os.path.join(out, mobile.PHONE_JSON))
    assert phone["input_shape"] == [1, 3, 224, 224] and len(phone["class_names"]) == 1000
    model, ckpt = load_model(lite0)
    known = Manifest.from_checkpoint(ckpt)
    prep = Preprocessing.from_dict(known.preprocessing)
    imgs = photos.load_photos()
    names = ["chelsea", "coffee", "rocket", "camera", "china"]
    x = torch.stack([phone_input(imgs[n], phone)[0] for n in names])  # as a phone would make them
    assert_within_one_grey(x, torch.stack([prep(imgs[n]) for n in names]), prep, atol=1e-5)
    with torch.inference_mode():
        want = model(x).softmax(1)
    for fmt in MOBILE:
        got = backends.load(os.path.join(out, backends.get(fmt).file), fmt)(x).softmax(1)
        assert torch.equal(got.argmax(1), want.argmax(1)), fmt
        assert (got - want).abs().max().item() <= 1e-4, fmt
    assert known.class_names[want[0].argmax()] in {"tabby", "tiger cat", "Egyptian cat"}


# --- the latency tool and setup.sh --mobile -------------------------------------------------------


@pytest.mark.slow
def test_the_latency_tool_times_eager_and_each_mobile_runtime(mobile_export, tmp_path, capsys):
    from bench.mobile import get_args_parser, main

    threads = torch.get_num_threads()
    try:
        main(get_args_parser().parse_args(["--export-dir", mobile_export[0], "--runs", "3", "--warmup", "1",
                                           "--json", str(tmp_path / "m.json")]))  # fmt: skip
    finally:
        torch.set_num_threads(threads)  # the tool sets torch's process-wide pool
    report = read_json(tmp_path / "m.json")
    want = {"eager", "lite interpreter"} | ({"executorch xnnpack"} if HAVE_EXECUTORCH else set())
    assert set(report["runtimes"]) == want and report["input_shape"] == [1, 1, 16, 16]
    for r in report["runtimes"].values():
        assert 0 < r["p50_ms"] <= r["p90_ms"] and r["bytes"] > 0
    assert "lite interpreter" in capsys.readouterr().out


def mobile_repo(tmp_path):
    repo = fake_repo(tmp_path, "setup.sh")
    (repo / "requirements-mobile.txt").write_text("executorch==1.5.1\n")
    return repo


def pip_files(calls):
    return [c[c.index("-r") + 1] for c in calls if c[1:4] == ["-m", "pip", "install"]]


def test_setup_mobile_installs_executorch_once_and_only_when_asked(tmp_path):
    repo = mobile_repo(tmp_path)
    out, calls = run_script(tmp_path, repo, ["scripts/setup.sh"])
    assert out.returncode == 0, out.stderr
    assert pip_files(calls) == ["requirements.txt"]  # the base environment stays as it is
    out, calls = run_script(tmp_path, repo, ["scripts/setup.sh", "--mobile"])
    assert out.returncode == 0, out.stderr
    assert pip_files(calls) == ["requirements-mobile.txt"]
    out, calls = run_script(tmp_path, repo, ["scripts/setup.sh", "--mobile"])
    assert pip_files(calls) == [] and "ExecuTorch (requirements-mobile.txt) is up to date" in out.stdout
    (repo / "requirements-mobile.txt").write_text("executorch==1.5.2\n")
    out, calls = run_script(tmp_path, repo, ["scripts/setup.sh", "--mobile"])
    assert pip_files(calls) == ["requirements-mobile.txt"]


def test_setup_mobile_failing_writes_no_stamp_and_an_unknown_flag_is_refused(tmp_path):
    repo = mobile_repo(tmp_path)
    assert run_script(tmp_path, repo, ["scripts/setup.sh"])[0].returncode == 0
    out, _ = run_script(tmp_path, repo, ["scripts/setup.sh", "--mobile"], FAKE_PIP_FAILS="1")
    assert out.returncode != 0 and "pip install failed (-r requirements-mobile.txt" in out.stderr
    assert not (repo / ".venv" / ".requirements-mobile.sha256").exists()
    out, calls = run_script(tmp_path, repo, ["scripts/setup.sh", "--mobil"])
    assert out.returncode == 2 and "unknown option --mobil" in out.stderr and calls == []
