#!/usr/bin/env bash
# Benchmark: in-process limit vs served (concurrency 1/4/16/64) vs TorchServe's stock handler,
# plus cold start. Writes bench_results/bench.{json,png}. Arguments go to bench/bench.py.
#   scripts/bench.sh overload [args]: good answers and rejections past capacity, TorchServe alone and behind
#   the HTTPS front door (bench/overload.py, wrk); writes bench_results/overload.{json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "${1:-}" = overload ]; then shift; exec .venv/bin/python -m bench.overload "$@"; fi
exec .venv/bin/python -m bench.bench "$@"
