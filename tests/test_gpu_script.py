import json
import os
import signal
import subprocess

import pytest
import torch

from model_src import backends
from model_src.backends.onnx import providers
from model_src.explain import model_device
from tests.conftest import ROOT, require_tool

SCRIPT = os.path.join(ROOT, "bench", "gpu.sh")


def run_script(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """bench/gpu.sh in its own process group, killed whole (TorchServe's workers too) if it overstays."""
    proc = subprocess.Popen(
        [SCRIPT, *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"bench/gpu.sh ran past {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.torchserve
def test_cpu_run_prints_every_row_and_every_answer_is_right(tmp_path):
    require_tool("wrk")
    out_json = tmp_path / "gpu.json"
    res = run_script(["--device", "cpu", "--quick", "--json", str(out_json)], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(out_json.read_text())
    rows = {r["backend"]: r for r in report["rows"]}
    assert report["levels"] == [1, 4] and report["all_right"] is True
    assert set(rows) == {"eager", "torchscript", "onnx"} and {r["model"] for r in rows.values()} == {"digits"}
    for name in ("eager", "torchscript"):
        row = rows[name]
        assert row["device"] == "cpu" and row["train_ms_step"] > 0 and row["ms_b1"] > 0 and row["ms_b8"] > 0
        assert row["top1_agree"] == row["checked"] > 0
        assert set(row["served"]) == {"1", "4"} and all(s["requests"] > 0 for s in row["served"].values())
        assert all(s["errors"] == 0 for s in row["served"].values())
        assert [a["answers"] for a in row["answers"]] == [row["checked"]] * 2
        assert all(a["errors"] == 0 and a["wrong"] == 0 for a in row["answers"])
    # the printed table: its header, one line per row with the served cells, and the verdict
    lines = res.stdout.splitlines()
    assert any(line.startswith("| model | backend | device | train ms/step") for line in lines)
    for name in ("eager", "torchscript"):
        (line,) = [x for x in lines if x.startswith(f"| digits | {name} | cpu |")]
        assert f"served {2 * rows[name]['checked']}/{2 * rows[name]['checked']} right" in line
    assert "every answer right" in lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_cuda_it_exits_2_with_one_clear_line():
    res = run_script([], timeout=120)
    assert res.returncode == 2
    assert "no CUDA GPU visible to torch" in res.stderr and "--device cpu" in res.stderr
    assert res.stdout == ""


def test_onnx_providers_for_each_device():
    cpu_only = ["CPUExecutionProvider"]
    assert providers("cpu", cpu_only) == cpu_only
    assert providers("cuda:1", ["CUDAExecutionProvider", *cpu_only]) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    with pytest.raises(backends.BackendUnavailable, match="onnxruntime-gpu"):
        providers("cuda:0", cpu_only)  # never a silent CPU run reported as the GPU's


def test_handler_devices_follow_torchserve_gpu_id():
    from handlers.image_classifier import devices

    onnx, eager, script = backends.get("onnx"), backends.get("eager"), backends.get("torchscript")
    assert devices(1, script, True) == ("cuda:1", "cuda:1")
    assert devices(0, onnx, True) == ("cpu", "cuda:0")  # ORT's CPU provider; explanations on the GPU
    assert devices(0, eager, False) == ("cpu", "cpu")  # gpu_id without CUDA (a CPU-only torch)
    assert devices(None, eager, True) == ("cpu", "cpu")  # a CPU worker on a GPU machine


def test_explanations_run_where_the_model_is():
    assert model_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")


def test_onnx_on_cuda_refuses_a_session_that_fell_back_to_the_cpu(monkeypatch):
    """onnxruntime-gpu whose CUDA libraries do not match builds the session anyway, on the CPU, with a
    warning: the runner refuses it rather than time the CPU as the GPU."""
    import onnxruntime as ort

    from model_src.backends.onnx import OnnxRunner

    class FellBack:
        def __init__(self, path, opts, providers):
            self.asked = providers

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", FellBack)
    with pytest.raises(backends.BackendUnavailable, match="could not start its CUDA provider"):
        OnnxRunner("model.onnx", 1, "cuda:0")
