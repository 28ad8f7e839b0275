"""openvino-int8: model_src/backends/openvino.py, quantised by NNCF (post-training, on the training split)."""

from model_src.backends.openvino import variant

BACKEND = variant("int8")
