"""`--backend auto` (deploy/backend_choice.py): the archive step measures the candidates that pass export's
checks on this machine, ships the fastest and records the measurement in the archive's manifest; a small
model keeps the default without measuring.

The measured path runs on the session's digits checkpoint with the size threshold lowered (an EfficientNet
export of four candidates takes minutes; bench/bench.py and the quickstart run it on the real model). That
checkpoint, 3 epochs, is one whose OpenVINO int8 fails the precision gate (docs/training.md): the gate's
refusal must leave the candidate out, not fail the archive.
"""

import zipfile

import pytest

from deploy import backend_choice
from deploy.archive import archive_checkpoint, read_bundle
from model_src import backends
from model_src.backends import openvino


@pytest.fixture
def measured(monkeypatch):
    """Every model counts as a real one, and bf16 as missing its units (whatever this CPU has)."""
    monkeypatch.setattr(backend_choice, "REAL_MODEL_SIZE", 1)
    monkeypatch.setattr(openvino, "bf16_units", lambda: "this CPU has neither AMX nor AVX-512 BF16 (test)")


def test_a_small_model_keeps_the_default_without_measuring(checkpoint, tmp_path):
    built = archive_checkpoint(checkpoint, "1.0", output=str(tmp_path / "m.mar"))
    assert built["backend"] == backends.DEFAULT
    choice = read_bundle(built["archive"]).archive.backend_choice
    assert choice["backend"] == backends.DEFAULT and choice["ms_per_image"] == {}
    assert "not measured" in choice["rule"]


def test_auto_ships_the_fastest_candidate_that_passes_and_records_why(checkpoint, tmp_path, measured, capsys):
    built = archive_checkpoint(checkpoint, "1.0", output=str(tmp_path / "m.mar"))
    bundle = read_bundle(built["archive"])
    choice = bundle.archive.backend_choice
    assert choice["rule"] == "measured" and choice["backend"] == built["backend"] == bundle.backend.name
    timed = choice["ms_per_image"]
    assert set(timed) == {"onnx", "openvino"}, timed
    assert choice["backend"] == min(timed, key=timed.get)
    assert all(ms > 0 for ms in timed.values())
    # left out, each with its reason: int8 by the gate (with its figures), bf16 for want of the CPU's units
    assert "refused by the precision gate" in choice["left_out"]["openvino-int8"]
    assert "noise floor" in choice["left_out"]["openvino-int8"]
    assert "neither AMX nor AVX-512 BF16" in choice["left_out"]["openvino-bf16"]
    assert "archive: openvino-bf16 left out: this CPU has neither" in capsys.readouterr().out
    assert choice["batch"] == 4 and choice["threads"] >= 1
    # the archive ships the chosen file (and the eager weights where it has no gradients), nothing else
    with zipfile.ZipFile(built["archive"]) as z:
        members = set(z.namelist())
    assert backends.get(choice["backend"]).file in members
    others = {backends.get(n).file for n in backend_choice.CANDIDATES if n != choice["backend"]}
    assert not others & members


def test_auto_fails_clearly_when_no_candidate_passes(checkpoint, tmp_path, measured, monkeypatch):
    monkeypatch.setattr(backend_choice, "CANDIDATES", ("openvino-int8",))
    with pytest.raises(ValueError, match="no candidate passed export here.*openvino-int8"):
        archive_checkpoint(checkpoint, "1.0", output=str(tmp_path / "m.mar"))
    assert not (tmp_path / "m.mar").exists()


def test_the_fastest_wins(monkeypatch):
    """choose() takes the lowest median, whichever order the candidates come in."""
    monkeypatch.setattr(backend_choice, "time_backends", lambda files, *a: {"onnx": 7.5, "openvino": 4.0})
    got = backend_choice.choose({"onnx": "a", "openvino": "b"}, {"openvino-int8": "refused"}, (3, 8, 8), 4, 2)
    assert got.backend == "openvino" and got.left_out == {"openvino-int8": "refused"}
    assert "openvino, the fastest here" in got.summary()


@pytest.mark.parametrize(
    "formats, runs_on",
    [(["int8", "onnx"], "OnnxRunner"), (["int8", "eager"], "ResNetClassifier")],
    ids=["onnx", "eager"],
)
def test_the_gates_fp32_side_runs_on_a_checked_fast_file_when_export_has_one(
    checkpoint, tmp_path, monkeypatch, formats, runs_on
):
    """The noise floor is 9 passes of fp32 over 400 crops: on ONNX Runtime once its file has passed the exact
    check (exported first, whatever the order asked), else on the eager model."""
    from train import export, precision

    seen = []
    real = precision.Reference.of.__func__

    def spy(cls, runner, *args, **kwargs):
        seen.append(type(runner).__name__)
        return real(cls, runner, *args, **kwargs)

    monkeypatch.setattr(precision.Reference, "of", classmethod(spy))
    report = export.export_all(checkpoint, str(tmp_path / "out"), formats=formats)
    assert seen == [runs_on] and report["formats"]["int8"]["passed"]
