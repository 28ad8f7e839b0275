#!/usr/bin/env bash
# Reliability suite on a private TorchServe (free ports; the demo server is untouched):
# 10,000-request mixed load, worker SIGKILL, restart, bad registrations during load.
# Writes soak_results/soak.json; exits non-zero if a scenario fails. Arguments go to bench/soak.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m bench.soak "$@"
