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
    fastest = min(timed, key=timed.get)
    leads = timed[fastest] <= backend_choice.WIN_SHARE * timed["onnx"]
    assert choice["backend"] == (fastest if leads else "onnx")
    assert all(ms > 0 for ms in timed.values())
    # left out, each with its reason: int8 by the gate (with its figures), bf16 for want of the CPU's units
    assert "refused by the precision gate" in choice["left_out"]["openvino-int8"]
    assert "noise floor" in choice["left_out"]["openvino-int8"]
    assert "neither AMX nor AVX-512 BF16" in choice["left_out"]["openvino-bf16"]
    assert "archive: openvino-bf16 left out: this CPU has neither" in capsys.readouterr().out
    assert choice["batch"] == 4 and choice["threads"] >= 1
    assert choice["machine"]["cores"] and "onnxruntime" in choice["machine"]
    # the refused file was not kept, and the archive ships the chosen file (and the eager weights)
    assert "openvino-int8" not in bundle.checks["formats"] and "openvino-int8" in bundle.checks["refused"]
    with zipfile.ZipFile(built["archive"]) as z:
        assert backends.get(choice["backend"]).file in set(z.namelist())


def test_auto_times_only_what_the_export_folders_manifest_says_passed(
    checkpoint, tmp_path, measured, monkeypatch
):
    """An export folder made by hand or merged: a file its manifest lists as refused, or with no check at all,
    is not a candidate, whatever the folder holds."""
    from deploy.archive import build_archive
    from model_src import manifest
    from train.export import export_all

    out = str(tmp_path / "export")
    export_all(
        checkpoint, out, formats=["onnx", "openvino", "openvino-int8", "eager"], optional={"openvino-int8"}
    )
    bundle = manifest.read(out)
    bundle.files["openvino-int8"] = "model.openvino-int8.zip"  # listed again, by hand
    (tmp_path / "export" / "model.openvino-int8.zip").write_bytes(b"refused at export")
    del bundle.checks["formats"]["openvino"]  # a file nobody checked
    bundle.write(out)
    timed = {}
    monkeypatch.setattr(
        backend_choice, "time_backends", lambda files, *a: timed.update(files) or {"onnx": 1.0}
    )
    built = build_archive(out, "1.0", output=str(tmp_path / "m.mar"))
    assert set(timed) == {"onnx"} and built["backend"] == "onnx"
    left = built["backend_choice"]["left_out"]
    assert "refused by the precision gate" in left["openvino-int8"]
    assert left["openvino"] == "the export folder's manifest has no check of it"


def test_auto_fails_clearly_when_no_candidate_passes(checkpoint, tmp_path, measured, monkeypatch):
    monkeypatch.setattr(backend_choice, "CANDIDATES", ("openvino-int8",))
    with pytest.raises(ValueError, match="no candidate passed export here.*openvino-int8"):
        archive_checkpoint(checkpoint, "1.0", output=str(tmp_path / "m.mar"))
    assert not (tmp_path / "m.mar").exists()


@pytest.mark.parametrize(
    "ms, wins",
    [
        ({"openvino-bf16": 4.0, "onnx": 7.5, "openvino": 8.2}, "openvino-bf16"),  # AMX's 1.9x
        ({"openvino": 6.0, "onnx": 7.5}, "openvino"),  # exactly WIN_SHARE
        ({"openvino": 6.4, "onnx": 7.5}, "onnx"),  # 0.85x: this VM's noise between two runs
        ({"openvino": 6.4, "openvino-bf16": 9.0}, "openvino"),  # no default timed: the fastest
    ],
)
def test_the_fastest_wins_by_more_than_the_noise(monkeypatch, ms, wins):
    """choose() takes the lowest median, whichever order the candidates come in, unless it leads the default
    by less than this machine's noise."""
    monkeypatch.setattr(backend_choice, "time_backends", lambda files, *a: ms)
    got = backend_choice.choose(dict.fromkeys(ms, "path"), {"openvino-int8": "refused"}, (3, 8, 8), 4, 2)
    assert got.backend == wins and got.left_out == {"openvino-int8": "refused"} and got.ms_per_image == ms
    assert got.summary().startswith(f"{wins} at batch 4")


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


def test_a_candidate_whose_converter_crashes_is_left_out_not_fatal(
    checkpoint, tmp_path, measured, monkeypatch
):
    """OpenVINO's and NNCF's own exceptions are neither ExportError nor a gate refusal: an optional candidate
    that raises one is left out with its type and message, and the archive is still built."""
    import dataclasses

    def crash(job, path):
        raise RuntimeError("OpConversionFailure: no lowering for aten::frobnicate")

    registry = backends.all_backends()
    broken = dataclasses.replace(registry["openvino"], export=crash)
    monkeypatch.setattr(backends, "_REGISTRY", {**registry, "openvino": broken})
    monkeypatch.setattr(backend_choice, "CANDIDATES", ("onnx", "openvino"))
    built = archive_checkpoint(checkpoint, "1.0", output=str(tmp_path / "m.mar"))
    assert built["backend"] == "onnx"
    assert built["backend_choice"]["left_out"]["openvino"] == (
        "RuntimeError: OpConversionFailure: no lowering for aten::frobnicate"
    )
