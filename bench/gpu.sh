#!/usr/bin/env bash
# The CUDA path in one run: AMP training steps, eager/TorchScript(/ONNX) on the GPU, TorchServe with GPU
# workers at c=1 and c=16, one table at the end (bench/gpu.py has the details).
#   bench/gpu.sh                         # needs a CUDA GPU that torch sees; exits 2 without one
#   bench/gpu.sh --device cpu --quick    # the same script on the CPU (CI: tests/test_gpu_script.py)
# Installs nothing: for ONNX on CUDA, `pip install onnxruntime-gpu` beforehand (the row says if it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
device=cuda
prev=
for arg in "$@"; do
  case $arg in --device=*) device=${arg#--device=} ;; esac
  if [ "$prev" = --device ]; then device=$arg; fi
  prev=$arg
done
# One torch import answers both questions: 3 = torch without a CUDA device, any other failure = no torch.
rc=0
version=$("$PY" -c 'import sys, torch; print(torch.__version__); sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null) || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then
  echo "bench/gpu.sh: $PY cannot import torch: run scripts/setup.sh first" >&2
  exit 2
fi
if [ "$rc" -eq 3 ] && [ "$device" != cpu ]; then
  echo "bench/gpu.sh: no CUDA GPU visible to torch $version (nothing to measure here); bench/gpu.sh --device cpu runs the same steps on the CPU" >&2
  exit 2
fi
exec "$PY" -m bench.gpu "$@"
