"""The benchmark's floor handler: answers {"0": 1.0} to every request without reading it.

Served with the same model-config.yaml (workers, batch size, delay) as the real handler, it measures what
TorchServe itself costs per request on this machine: HTTP in the Java frontend, the socket hop to a Python
worker, the worker's framing and JSON. The benchmark's additive estimate starts from it.

Archived with `handler: {busy_file: PATH}` in its model-config (bench/noop.py build_busy_archive), it is the
benchmark's *ideal* handler: before answering, it spends the CPU time that PATH names per image (microseconds,
the in-process limit's, written by the bench right before each row) and nothing else. Served, it is the best
any handler with that cost can do behind this TorchServe on this machine."""

import json
import os
import time

busy = {"file": None, "mtime": None, "us": 0.0}


def handle(data, context):
    """TorchServe's entry point: answer {"0": 1.0} to each request, after the busy file's CPU time
    per image when one is set; a None batch is the initialisation call, which reads the busy file's path."""
    if data is None:  # TorchServe's initialisation call
        config = getattr(context, "model_yaml_config", None) or {}
        busy["file"] = (config.get("handler") or {}).get("busy_file")
        return None
    if busy["file"]:
        spend(len(data) * per_image_us() / 1e6)
    return [json.dumps({"0": 1.0})] * len(data)


def per_image_us() -> float:
    """The file's number, re-read only when the bench rewrites it (one stat per batch)."""
    mtime = os.stat(busy["file"]).st_mtime_ns
    if mtime != busy["mtime"]:
        with open(busy["file"]) as f:
            busy["us"], busy["mtime"] = float(f.read()), mtime
    return busy["us"]


def spend(seconds: float):
    """Burn this much of the thread's own CPU time: time spent preempted does not count, as it would not for a
    handler's real work."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
