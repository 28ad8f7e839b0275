"""The bundle manifest (model_src/manifest.py) and the backend registry (model_src/backends/): a versioned
JSON form, old checkpoints still read, a backend added by one file, no backend file name typed elsewhere, the
archive checks and the registry importable without torch."""

import ast
import json
import os
import subprocess
import sys
import zipfile

import pytest

from deploy import mar
from handlers import image_classifier
from model_src import backends, manifest
from model_src.manifest import Manifest, ManifestError, Metrics, Provenance
from tests.conftest import ROOT

PREP = {"image_size": 16, "resize_size": None, "channels": 1, "mean": [0.5], "std": [0.5], "background": 255}


def test_the_json_form_round_trips_and_names_its_schema():
    m = Manifest(
        {"arch": "resnet_small"}, ["a", "b"], PREP, Provenance("/data", "python -m train.train", None)
    )
    m.provenance.metrics = Metrics(0.9, 2, 3, 0.85)
    d = json.loads(json.dumps(m.to_dict()))
    assert d["schema"] == manifest.SCHEMA == 1 and Manifest.from_dict(d) == m


@pytest.mark.parametrize("schema", [2, None, "1"])
def test_an_unknown_schema_is_refused_by_name(schema):
    d = Manifest({}, ["a"], PREP).to_dict()
    d["schema"] = schema
    with pytest.raises(ManifestError, match=f"schema {schema!r} is not 1"):
        Manifest.from_dict(d)


def test_an_old_checkpoint_reads_as_a_manifest():
    """Checkpoints from before the manifest (and bundled pretrained ones) hold its facts at the top level."""
    old = {
        "model": {},
        "model_args": {"arch": "resnet_small"},
        "class_names": ["0", "1"],
        "preprocessing": PREP,
        "epoch": 3,
        "best_metric": {"acc": 0.9, "loss": 0.3, "epoch": 2},
        "args": {"data": "/data/digits", "output_dir": "runs/v1"},
    }
    m = Manifest.from_checkpoint(old)
    assert (m.model_args, m.class_names, m.preprocessing) == ({"arch": "resnet_small"}, ["0", "1"], PREP)
    assert m.provenance.data == "/data/digits" and m.provenance.metrics == Metrics(0.9, 2, 3, None)
    assert Manifest.from_checkpoint({"model": {}, "manifest": m.to_dict()}) == m  # the new form


def test_the_gate_reads_class_names_from_the_archives_manifest(tmp_path):
    path = tmp_path / "m.mar"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(manifest.FILE, json.dumps(Manifest({}, ["cat", "dog"], PREP).to_dict()))
    assert mar.read_classes(str(path)) == ["cat", "dog"]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("index_to_name.json", '{"0": "cat"}')
    with pytest.raises(ValueError, match="has no bundle.json"):
        mar.read_classes(str(path))


def test_an_archive_built_before_the_manifest_still_reads(tmp_path):
    """Archives in a user's model store from before bundle.json (serving.json + TorchServe's MANIFEST.json)
    keep serving and keep passing the gate's class check: the same manifest from the zip and from its unpacked
    folder."""
    serving = {"model_args": {"arch": "x"}, "class_names": ["cat", "dog"], "preprocessing": PREP}
    serving.update(
        args={"data": "/data/pets"}, best_metric={"acc": 0.9, "epoch": 3}, epoch=4, export={"tolerance": 1}
    )
    members = {
        "serving.json": json.dumps(serving),
        "MAR-INF/MANIFEST.json": json.dumps({"model": {"serializedFile": "model.onnx"}}),
        "model.onnx": "",
        "model.pt": "",
    }
    path = tmp_path / "old.mar"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(path) as z:
        z.extractall(folder)
    for m in (mar.read_bundle(str(path)), manifest.read(str(folder))):
        assert m.class_names == ["cat", "dog"] and m.backend.name == "onnx"
        assert m.files == {"onnx": "model.onnx", "eager": "model.pt"}
        assert (m.provenance.data, m.provenance.metrics.best_val_acc, m.checks) == (
            "/data/pets",
            0.9,
            {"tolerance": 1},
        )


# --- the registry -------------------------------------------------------------------------------------------

TINY = """
from model_src.backends import Backend


def export(job, path):
    open(path, "w").close()


BACKEND = Backend("tiny", "model.tiny", gpu=False, differentiable=False, server=True, exact=True,
                  precision="fp32", export=export, load=lambda path, device, threads: None)
"""


def test_a_new_file_in_the_package_is_a_new_backend(tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text(TINY)
    monkeypatch.setattr(backends, "__path__", [*backends.__path__, str(tmp_path)])
    monkeypatch.setattr(backends, "_REGISTRY", None)
    try:
        assert backends.get("tiny").file == "model.tiny" and "tiny" in backends.served()
        assert backends.by_file("model.tiny").name == "tiny"
    finally:
        sys.modules.pop("model_src.backends.tiny", None)
    with pytest.raises(ValueError, match="unknown backend 'nope'; choose one of"):
        backends.get("nope")


def test_every_backend_says_what_it_can_do():
    found = backends.all_backends()
    assert {"eager", "torchscript", "onnx", "int8", "ptl", "pte"} <= set(found)
    assert len({b.file for b in found.values()}) == len(found)  # a file names one backend
    assert [n for n, b in found.items() if not b.server] == ["pte", "ptl"]
    assert not found["onnx"].gpu and not found["int8"].gpu and found["eager"].differentiable
    assert not found["int8"].exact and found["int8"].precision == "int8"


def test_the_registry_and_the_archive_checks_import_no_torch():
    code = (
        "import sys; from model_src import backends; import deploy.mar; backends.all_backends(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


FILES = ("model.onnx", "model.int8.pt", "model.torchscript.pt", "model.ptl", "model.pte", "model.pt")


def string_literals(tree: ast.AST):
    """Every string constant of a module except docstrings (docs may name files)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_no_module_outside_the_registry_types_a_backend_file_name():
    found = []
    for folder in ("model_src", "train", "deploy", "handlers", "bench", "scripts", "container"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            if os.path.join("model_src", "backends") in dirpath:
                continue
            for name in names:
                path = os.path.join(dirpath, name)
                if name.endswith(".py"):
                    with open(path) as f:
                        literals = [n.value for n in string_literals(ast.parse(f.read()))]
                elif name.endswith(".sh"):
                    with open(path) as f:
                        literals = [line for line in f if not line.lstrip().startswith("#")]
                else:
                    continue
                found += [
                    f"{os.path.relpath(path, ROOT)}: {s!r}" for s in literals if any(f in s for f in FILES)
                ]
    assert found == []


def test_only_torchserves_own_worker_gets_a_memory_ceiling(monkeypatch):
    """The handler tells a real worker by its own command line, not by reading another process's /proc."""
    monkeypatch.setattr(
        sys, "argv", ["/venv/lib/python3.11/site-packages/ts/model_service_worker.py", "--sock-type"]
    )
    assert image_classifier.in_frontend_worker()
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert not image_classifier.in_frontend_worker()


# --- archiving an export folder -----------------------------------------------------------------------------


def test_an_archive_is_built_from_an_export_folder_and_adds_its_part(tmp_path, monkeypatch):
    """build_archive reads the folder's bundle.json and packs; it neither exports nor imports train.export."""
    import hashlib

    from deploy import archive
    from tests.test_tools import fake_export

    fake_export().export_all("unused.pt", str(tmp_path / "export"), ["onnx", "eager", "int8"])
    monkeypatch.setitem(sys.modules, "train.export", None)  # importing it now fails
    info = archive.build_archive(str(tmp_path / "export"), "2.0", "onnx", model_store=str(tmp_path / "store"))
    assert info["archive"] == str(tmp_path / "store" / "my_model_v2.0.mar")
    bundle = mar.read_bundle(info["archive"])
    assert (bundle.backend.name, bundle.backend.file, bundle.backend.precision) == (
        "onnx",
        "model.onnx",
        "fp32",
    )
    # int8 stays out; the eager weights go in
    assert bundle.files == {
        "onnx": "model.onnx",
        "eager": "model.pt",
    }
    assert (
        bundle.archive.file == "my_model_v2.0.mar"
        and bundle.archive.version == "2.0"
        and bundle.archive.built
    )
    with zipfile.ZipFile(info["archive"]) as z:
        inside = {name: hashlib.sha256(z.read(name)).hexdigest() for name in z.namelist()}
    assert bundle.archive.digests and all(
        inside[name] == digest for name, digest in bundle.archive.digests.items()
    )
    assert set(inside) - set(bundle.archive.digests) == {
        manifest.FILE,
        "MAR-INF/MANIFEST.json",
        "model-config.yaml",
    }
    with pytest.raises(ValueError, match="export folder has no torchscript file"):
        archive.build_archive(
            str(tmp_path / "export"), "3.0", "torchscript", model_store=str(tmp_path / "store")
        )
    with pytest.raises(ValueError, match="TorchServe cannot serve the ptl backend"):
        archive.build_archive(str(tmp_path / "export"), "3.0", "ptl", model_store=str(tmp_path / "store"))


# --- archives that are not ours or are broken: ValueError, never another exception (review M5) -------------
def flip(raw: bytearray, at: dict[bytes, int], value: bytes):
    """Write `value` at the offset given per zip header signature (local file header, central directory)."""
    for sig, offset in at.items():
        i = raw.find(sig) + offset
        raw[i : i + len(value)] = value


def encrypted(raw: bytearray):  # general-purpose flag bit 0: zipfile wants a password (RuntimeError)
    flip(raw, {b"PK\x03\x04": 6, b"PK\x01\x02": 8}, b"\x01\x00")


def method99(raw: bytearray):  # an unknown compression method (NotImplementedError)
    flip(raw, {b"PK\x03\x04": 8, b"PK\x01\x02": 10}, b"\x63\x00")


BROKEN = {
    "a list, not an object": (b"[]", None),
    "no model object": (b'{"model": 1}', None),
    "nested 100,000 deep": (b"[" * 100_000, None),
    "encrypted member": (b'{"model": {"modelName": "m", "modelVersion": "1.0"}}', encrypted),
    "compression method 99": (b'{"model": {"modelName": "m", "modelVersion": "1.0"}}', method99),
    "a member over 1 MiB": (b'{"model": {"modelName": "m"}}' + b" " * (1 << 20), None),  # mar.MEMBER_MAX
}


def broken_mar(path: str, how: str) -> str:
    """An archive whose MAR-INF/MANIFEST.json (and bundle.json) is broken as BROKEN[how] says."""
    text, tweak = BROKEN[how]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("MAR-INF/MANIFEST.json", text)
        z.writestr(manifest.FILE, text)
    if tweak:
        with open(path, "rb") as f:
            raw = bytearray(f.read())
        tweak(raw)
        with open(path, "wb") as f:
            f.write(raw)
    return path


@pytest.mark.parametrize("how", BROKEN)
def test_a_broken_archive_is_a_value_error_and_the_door_skips_it(how, tmp_path, capsys):
    from deploy.frontdoor import oip_models

    path = broken_mar(str(tmp_path / "m.mar"), how)
    for read in (mar.read_manifest, mar.read_bundle):
        with pytest.raises(ValueError):  # was: TypeError, RecursionError, RuntimeError, NotImplementedError
            read(path)
    assert oip_models(str(tmp_path)) == {}  # the door starts without it
    assert "m.mar has no v2 metadata" in capsys.readouterr().err
