"""openvino-bf16: model_src/backends/openvino.py compiled at bf16 inference precision."""

from model_src.backends.openvino import variant

BACKEND = variant("bf16")
