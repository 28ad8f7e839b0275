"""The layout's promises: scripts/ holds only shell doors, an archive ships model_src/ whole and nothing of
train/, paths resolve the same from any working directory, and the small shared definitions (top-1, the
percentile, the deployment CLI's rules) behave as the docs say."""

import glob
import os
import subprocess
import sys
import zipfile

import pytest

from bench import bench, soak
from bundle import settings
from deploy import latency
from deploy.archive import archive_checkpoint, archive_name
from deploy.client import top1


def test_scripts_holds_only_shell_entry_points():
    assert glob.glob(os.path.join(settings.ROOT, "scripts", "*.py")) == []
    assert os.path.exists(os.path.join(settings.ROOT, "scripts", "serve.sh"))


@pytest.mark.slow
def test_an_archive_ships_the_model_src_package_exactly(checkpoint, tmp_path):
    mar = archive_checkpoint(checkpoint, "1.0", "eager", output=str(tmp_path / "m.mar"))["archive"]
    package = {
        os.path.relpath(p, settings.ROOT): open(p, "rb").read()
        for p in glob.glob(os.path.join(settings.MODEL_SRC, "**", "*.py"), recursive=True)
    }
    with zipfile.ZipFile(mar) as z:
        shipped = {n: z.read(n) for n in z.namelist() if n.startswith("model_src/") and not n.endswith("/")}
    assert shipped == package
    assert "model_src/losses.py" not in shipped and not any(n.startswith("train/") for n in shipped)


def test_paths_resolve_the_same_from_any_working_directory(tmp_path):
    code = "from train.data import DIGITS_DIR; from deploy.server import TorchServe; print(DIGITS_DIR)\n"
    code += "print(TorchServe().model_store)"
    env = {**os.environ, "PYTHONPATH": settings.ROOT}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [settings.DIGITS_DIR, settings.MODEL_STORE]
    assert all(os.path.isabs(p) for p in (settings.DIGITS_DIR, settings.MODEL_STORE, settings.RUNS_DIR))


def test_top1_is_the_most_probable_label_whatever_the_key_order():
    assert top1({"7": 0.1, "3": 0.85, "1": 0.05}) == "3"


def test_one_percentile_definition():
    assert latency.percentile([], 0.5) is None
    assert latency.percentile([10.0, 20.0, 30.0, 40.0], 0.5) == 25.0
    assert latency.summary([40.0, 10.0, 30.0, 20.0]) == pytest.approx(
        {"p50_ms": 25.0, "p90_ms": 37.0, "p99_ms": 39.7}
    )


def test_archive_names_refuse_odd_model_names_and_versions():
    assert (
        archive_name("imagenet", "1.0") == "imagenet.mar"
        and archive_name("my_model", "2.0") == "my_model_v2.0.mar"
    )
    for model, version in (("../x", "1.0"), ("my_model", "1.0;rm"), ("", "1.0")):
        with pytest.raises(ValueError):
            archive_name(model, version)


def test_bench_and_soak_refuse_unknown_names_with_the_known_ones(tmp_path):
    with pytest.raises(SystemExit, match="unknown target\\(s\\) resnet19; choose from digits, imagenet"):
        bench.main(
            bench.get_args_parser().parse_args(["--targets", "resnet19", "--no-peer", "--out", str(tmp_path)])
        )
    with pytest.raises(SystemExit, match="unknown scenario\\(s\\) __init__; choose from load, worker_death"):
        soak.main(["--scenarios", "__init__", "--checkpoint", __file__])
