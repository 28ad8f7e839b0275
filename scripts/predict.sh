#!/usr/bin/env bash
# Send one image to the running server with the inference token.
#   scripts/predict.sh IMAGE [VERSION]      e.g. scripts/predict.sh data/digits/val/3/0012.png 2.0
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/predict.sh IMAGE [VERSION]" >&2; exit 2; }
image=$1 version=${2:-}
[ -f "$image" ] || { echo "predict: $image not found" >&2; exit 1; }
# TS_INFERENCE_URL / TS_KEY_FILE point it at another server (the tests use their own).
url=${TS_INFERENCE_URL:-http://127.0.0.1:$(sed -n 's/^inference_address=.*:\([0-9]*\)$/\1/p' config.properties)}
key_file=${TS_KEY_FILE:-key_file.json}
auth=()
if [ -f "$key_file" ]; then
  token=$(.venv/bin/python -c 'import json, sys; print(json.load(open(sys.argv[1]))["inference"]["key"])' "$key_file")
  auth=(-H "Authorization: Bearer $token")
fi
curl -sS --fail-with-body "${auth[@]}" -T "$image" "$url/predictions/my_model${version:+/$version}"
echo
