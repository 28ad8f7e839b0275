"""The OpenVINO backends (model_src/backends/openvino.py): fp32 exact, bf16 said unavailable in one line where
the CPU has no bf16 units, int8 calibrated on the export job's batches; a small fixed CNN on real photo
crops."""

import pytest
import torch
from torch import nn

from model_src import backends
from model_src.backends import ExportError, ExportJob
from model_src.backends import openvino as ov_backend
from model_src.preprocessing import Preprocessing
from train import precision
from train.export import SERVER_FORMATS

pytest.importorskip("openvino")
PREP = Preprocessing(image_size=32, resize_size=36, channels=3, mean=[0.5] * 3, std=[0.25] * 3)


@pytest.fixture(scope="module")
def job():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()
    calibration = precision.photo_crops(PREP, 64, seed=2)
    return ExportJob(net, net, precision.photo_crops(PREP, 8, seed=1), lambda: calibration.split(16), None)


def probs(predict, x):
    with torch.inference_mode():
        return torch.softmax(predict(x), 1)


def test_the_three_variants_are_registered_and_chosen_only_when_named():
    variants = {name: backends.get(name) for name in ("openvino", "openvino-bf16", "openvino-int8")}
    assert [b.precision for b in variants.values()] == ["fp32", "bf16", "int8"]
    assert [b.exact for b in variants.values()] == [True, False, False]
    assert len({b.file for b in variants.values()}) == 3 and all(
        b.server and not b.gpu for b in variants.values()
    )
    assert not set(variants) & set(SERVER_FORMATS)  # not in the default export


def test_fp32_is_exact_at_any_batch_size(job, tmp_path):
    backend = backends.get("openvino")
    path = str(tmp_path / backend.file)
    backend.export(job, path)
    pred = backends.load(path, "openvino", threads=1)
    x = precision.photo_crops(PREP, 5, seed=3)
    for batch in (x[:1], x):  # the IR keeps a free batch size
        got = probs(pred, batch)
        assert got.dtype == torch.float32 and got.shape == (len(batch), 5)
        assert (got - probs(job.model, batch)).abs().max() <= 1e-4
    # each worker's threads float: pinned, two workers' single threads both landed on the first core
    assert pred.compiled.get_property("ENABLE_CPU_PINNING") is False


def test_bf16_without_bf16_units_says_why_in_one_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    why = ov_backend.bf16_units(str(cpuinfo))
    assert why and "neither AMX nor AVX-512 BF16" in why and "\n" not in why
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_bf16\n")
    assert ov_backend.bf16_units(str(cpuinfo)) is None


def test_bf16_runs_where_the_cpu_has_bf16_units(job, tmp_path):
    backend = backends.get("openvino-bf16")
    if why := backend.available():
        with pytest.raises(backends.BackendUnavailable, match="neither AMX nor AVX-512 BF16"):
            backends.load(str(tmp_path / backend.file), backend.name)
        pytest.skip(why)
    path = str(tmp_path / backend.file)
    backend.export(job, path)
    x = precision.photo_crops(PREP, 5, seed=3)
    got = probs(backends.load(path, backend.name, threads=1), x)
    assert (got - probs(job.model, x)).abs().max() < 0.05  # bf16 keeps 8 bits of mantissa


def test_int8_is_calibrated_on_the_job_and_refused_without_calibration(job, tmp_path):
    backend = backends.get("openvino-int8")
    path = str(tmp_path / backend.file)
    backend.export(job, path)
    x = precision.photo_crops(PREP, 5, seed=3)
    got = probs(backends.load(path, backend.name, threads=1), x)
    assert got.shape == (5, 5) and (got - probs(job.model, x)).abs().max() < 0.2
    with pytest.raises(ExportError, match="needs calibration batches"):
        backend.export(ExportJob(job.model, job.fused, job.example, None, None), str(tmp_path / "nope.zip"))
    assert not (tmp_path / "nope.zip").exists()


def test_int8_reads_no_more_calibration_than_it_uses(job, tmp_path, monkeypatch):
    """Export hands the backend the whole training split: it takes CALIBRATION_SAMPLES images and stops (it
    once built a list of every image first: an ImageNet-sized split would not fit in memory)."""
    from model_src.backends import openvino

    monkeypatch.setattr(openvino, "CALIBRATION_SAMPLES", 20)
    crops = job.example.repeat(2, 1, 1, 1)  # 16 images a batch
    pulled = []

    def endless():
        while True:
            pulled.append(len(crops))
            assert sum(pulled) <= 20 + len(crops), "read past what calibration uses"
            yield crops

    backend = backends.get("openvino-int8")
    backend.export(ExportJob(job.model, job.fused, job.example, endless, None), str(tmp_path / backend.file))
    assert sum(pulled) == 32  # two batches of 16 hold the 20 images
