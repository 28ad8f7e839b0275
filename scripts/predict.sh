#!/usr/bin/env bash
# Send one image to the running server with the inference token; prints the server's JSON answer.
#   scripts/predict.sh IMAGE [VERSION]      e.g. scripts/predict.sh data/digits/val/3/0012.png 2.0
# The key is read from key_file.json in Python (never on a command line, where `ps` shows it) and an
# expired one is refreshed. TS_INFERENCE_URL / TS_KEY_FILE point it at another server (the tests use their own).
set -euo pipefail
source "$(dirname "$0")/paths.sh"
[ $# -ge 1 ] || { echo "usage: scripts/predict.sh IMAGE [VERSION]" >&2; exit 2; }
image=$1 version=${2:-}
[ -f "$image" ] || { echo "predict: $image not found" >&2; exit 1; }
image=$(abspath "$image")
cd "$(dirname "$0")/.."
exec .venv/bin/python -m deploy.predict --raw ${version:+--version "$version"} "$image"
