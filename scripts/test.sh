#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite; extra arguments go to pytest,
# e.g.  scripts/test.sh -m "not slow"   (unit tests only, about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
# ExecuTorch (the mobile tests, docs/mobile.md), KServe's client, the benchmark's peers (tests/test_peer_frameworks.py)
scripts/setup.sh --mobile --test-clients --bench-peers
exec .venv/bin/python -m pytest "$@"
