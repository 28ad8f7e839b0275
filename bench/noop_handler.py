"""The benchmark's floor handler: answers {"0": 1.0} to every request without reading it.

Served with the same model-config.yaml (workers, batch size, delay) as the real handler, it measures what
TorchServe itself costs per request on this machine: HTTP in the Java frontend, the socket hop to a Python
worker, the worker's framing and JSON. The benchmark's additive estimate starts from it."""

import json


def handle(data, context):
    return [json.dumps({"0": 1.0})] * len(data) if data else None
