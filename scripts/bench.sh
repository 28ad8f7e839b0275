#!/usr/bin/env bash
# Benchmark: in-process limit vs served (concurrency 1/4/16/64) vs TorchServe's stock handler,
# plus cold start. Writes bench_results/bench.{json,png}. Arguments go to bench/bench.py.
#   scripts/bench.sh overload [args]: good answers and rejections past capacity, TorchServe alone and behind
#   the HTTPS front door (bench/overload.py, wrk); writes bench_results/overload.{json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "${1:-}" = overload ]; then shift; exec .venv/bin/python -m bench.overload "$@"; fi
# The peer (stock image_classifier) needs captum: installed beside, not into, .venv. The stamp is
# written only after pip succeeded, so a failed or interrupted install is redone on the next run.
if [ ! -f .bench_deps/.installed ]; then
  rm -rf .bench_deps
  log=.venv/bench-deps-install.log
  if ! .venv/bin/python -m pip install -q --no-deps --target .bench_deps -r requirements-bench.txt >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
    echo "bench: installing requirements-bench.txt into .bench_deps failed (full log: $log)" >&2
    rm -rf .bench_deps
    exit 1
  fi
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  touch .bench_deps/.installed
fi
exec .venv/bin/python -m bench.bench "$@"
