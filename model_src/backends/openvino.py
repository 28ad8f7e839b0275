"""openvino, openvino-bf16, openvino-int8: the model as OpenVINO IR, run by OpenVINO's CPU plugin.

The three are one module: BACKENDS names each variant (the registry reads BACKEND or BACKENDS of a module).
- openvino       fp32, exact (|Δprob| <= 1e-4 against eager).
- openvino-bf16  the same IR compiled with bf16 inference precision: AMX tiles or AVX-512 BF16 do the matrix
                 work. On a CPU with neither, OpenVINO would emulate bf16 (slower than fp32): `available` says
                 so.
- openvino-int8  post-training quantisation with NNCF, calibrated on the export job's training-split batches.
bf16 and int8 are not exact: export refuses them unless they pass the precision gate of train/precision.py
(noise floor, confident crops, labelled split), as it does torch's int8; bench/precisions.py prints the
gate's figures for each (docs/benchmarks.md).

The file is a zip holding OpenVINO's own IR (model.xml + model.bin, stored uncompressed), so that a backend
stays one file; loading reads both from memory. No gradients: explanations run on the eager weights shipped
beside it.
"""

import importlib.util
import itertools
import os
import tempfile
import warnings
import zipfile

from model_src.backends import Backend, ExportError, ExportJob
from model_src.cores import usable_cores

MEMBERS = ("model.xml", "model.bin")
# What OpenVINO calls each precision when compiling. fp32 is asked for explicitly: on a CPU with AMX,
# OpenVINO's default inference precision is bf16. int8 keeps the layers NNCF left unquantised in fp32.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of the units that run bf16 natively
CALIBRATION_SAMPLES = 300  # NNCF's default subset size; the export job's batches are counted image by image


def convert(job: ExportJob):
    """The fused model -> an OpenVINO model with a free batch size (OpenVINO's PyTorch frontend traces it;
    about 3x faster than going through torch.onnx's dynamo exporter, and as exact)."""
    import openvino as ov

    with warnings.catch_warnings():  # tracing warns about the Python-side padding arithmetic
        warnings.simplefilter("ignore")
        return ov.convert_model(
            job.fused, example_input=job.example[:1], input=[(-1, *job.example.shape[1:])]
        )


def samples(batches):
    """The images of `batches`, one by one, read only as far as the caller takes them."""
    for batch in batches:
        yield from batch


def quantize(model, job: ExportJob):
    """NNCF post-training quantisation (int8 weights and activations), calibrated on the training split."""
    import nncf

    if job.calibration is None:
        raise ExportError(
            "openvino-int8 needs calibration batches (the training split) and the export job has none"
        )
    # stop reading at CALIBRATION_SAMPLES: the job's batches are the whole training split
    images = [x[None].numpy() for x in itertools.islice(samples(job.calibration()), CALIBRATION_SAMPLES)]
    if not images:
        raise ExportError("openvino-int8: the calibration batches are empty")
    return nncf.quantize(model, nncf.Dataset(images), subset_size=len(images))


def save(model, path: str):
    """The IR as one zip file (stored: the weights do not compress)."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, MEMBERS[0])
        ov.save_model(model, xml, compress_to_fp16=False)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for member in MEMBERS:
                z.write(os.path.join(tmp, member), member)


class OpenVinoRunner:
    """A compiled OpenVINO model: float (B, C, H, W) -> logits (B, K) float32 CPU tensor."""

    def __init__(self, path: str, precision: str, threads: int | None):
        import numpy as np
        import openvino as ov

        with zipfile.ZipFile(path) as z:
            xml, weights = (z.read(member) for member in MEMBERS)
        core = ov.Core()
        model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, np.uint8)))
        config = {
            "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # One pool sized by the caller, as for ONNX Runtime: OpenVINO's default takes every core.
            "INFERENCE_NUM_THREADS": threads or usable_cores(),
            # Not pinned: each worker process would pin its threads to the same first cores (two workers of
            # one thread each both ran on core 0: 19.9 ms/image each, against 8.6 unpinned; served at c=16,
            # 69.5 req/s against ONNX Runtime's 122). The kernel spreads the workers.
            "ENABLE_CPU_PINNING": False,
        }
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch):
        """Float batch (B, C, H, W) -> logits (B, K), a copy of the request's output buffer."""
        import torch

        self.request.infer({0: batch.detach().cpu().contiguous().numpy()})
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


def missing_package(precision: str) -> str | None:
    """Why the `precision` variant cannot run for want of a package (openvino; nncf for int8), or None."""
    for package in ("openvino",) + (("nncf",) if precision == "int8" else ()):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed (pip install -r requirements.txt)"
    return None


def bf16_units(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """None if this CPU runs bf16 natively (AMX or AVX-512 BF16), else why not, in one line."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return f"cannot tell whether this CPU has bf16 units ({cpuinfo} is unreadable)"
    if not set(BF16_FLAGS) & set(flags):
        return (
            f"this CPU has neither AMX nor AVX-512 BF16 (no {' / '.join(BF16_FLAGS)} in "
            f"{cpuinfo}): OpenVINO would "
            "emulate bf16, slower than fp32; use the openvino backend"
        )
    return None


def variant(precision: str) -> Backend:
    """The OpenVINO backend for `precision` ("fp32", "bf16" or "int8")."""
    name = "openvino" if precision == "fp32" else f"openvino-{precision}"

    def export(job: ExportJob, path: str):
        model = convert(job)
        save(quantize(model, job) if precision == "int8" else model, path)

    def load(path: str, device: str, threads: int | None = None) -> OpenVinoRunner:
        return OpenVinoRunner(path, precision, threads)  # the CPU plugin whatever the device: gpu=False

    def available() -> str | None:
        return missing_package(precision) or (bf16_units() if precision == "bf16" else None)

    return Backend(
        name=name,
        file=f"model.{name}.zip",
        gpu=False,
        differentiable=False,
        server=True,
        exact=precision == "fp32",
        precision=precision,
        export=export,
        load=load,
        available=available,
        default=False,  # chosen when exporting or archiving (--formats / --backend)
    )


BACKENDS = [variant(precision) for precision in ("fp32", "bf16", "int8")]
