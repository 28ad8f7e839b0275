#!/usr/bin/env bash
# Archive a checkpoint as a version of my_model into model_store/ (never overwrites).
#   scripts/archive.sh VERSION CHECKPOINT [--backend onnx|eager|torchscript|int8]  (default onnx)
# 1.0 -> model_store/my_model.mar, others -> model_store/my_model_v<VERSION>.mar (+ .sha256)
set -euo pipefail
abspath() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
if [ $# -lt 2 ]; then
  echo "usage: scripts/archive.sh VERSION CHECKPOINT [--backend onnx|eager|torchscript|int8]  (default onnx)" >&2; exit 2
fi
version=$1 checkpoint=$2; shift 2
[ -f "$checkpoint" ] || { echo "archive: checkpoint $checkpoint not found (train first: python -m train.train)" >&2; exit 1; }
# Paths are relative to where we were called from: make them absolute before moving to the repo root.
checkpoint=$(abspath "$checkpoint")
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --output|--model-store|--config-file)
      if [ $# -ge 2 ]; then args+=("$1" "$(abspath "$2")"); shift 2; else args+=("$1"); shift; fi ;;
    --output=*|--model-store=*|--config-file=*) args+=("${1%%=*}=$(abspath "${1#*=}")"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
cd "$(dirname "$0")/.."
exec .venv/bin/python -m scripts.archive --version "$version" --checkpoint "$checkpoint" ${args[@]+"${args[@]}"}
