#!/usr/bin/env bash
# Benchmark: in-process limit vs served (concurrency 1/4/16/64) vs TorchServe's stock handler,
# plus cold start. Writes bench_results/bench.{json,png}. Arguments go to scripts/bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The peer (stock image_classifier) needs captum: installed beside, not into, .venv.
if [ ! -d .bench_deps ]; then
  .venv/bin/python -m pip install -q --no-deps --target .bench_deps -r requirements-bench.txt 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
fi
exec .venv/bin/python -m scripts.bench "$@"
