#!/usr/bin/env bash
# Archive a checkpoint as a version of a model (default my_model) into model_store/ (never overwrites).
#   scripts/archive.sh VERSION CHECKPOINT [--backend auto|onnx|openvino|openvino-bf16|openvino-int8|eager|torchscript|int8] [--model-name NAME]
# 1.0 -> model_store/NAME.mar, others -> model_store/NAME_v<VERSION>.mar (+ .sha256). A checkpoint trained
# on other classes is another model: give it its own --model-name (the promotion gate refuses it as a version).
set -euo pipefail
source "$(dirname "$0")/paths.sh"
if [ $# -lt 2 ]; then
  echo "usage: scripts/archive.sh VERSION CHECKPOINT [--backend auto|onnx|openvino|openvino-bf16|openvino-int8|eager|torchscript|int8] [--model-name NAME]  (defaults auto: onnx for a small model, measured for 224 px and up; my_model)" >&2; exit 2
fi
version=$1 checkpoint=$2; shift 2
[ -f "$checkpoint" ] || { echo "archive: checkpoint $checkpoint not found (train first: python -m train.train)" >&2; exit 1; }
checkpoint=$(abspath "$checkpoint")
absolute_options "--output --model-store --config-file" "$@"
cd "$(dirname "$0")/.."
exec .venv/bin/python -m deploy.archive --version "$version" --checkpoint "$checkpoint" ${ARGS[@]+"${ARGS[@]}"}
