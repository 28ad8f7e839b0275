"""Archive bench/noop_handler.py with a given model-config.yaml: the benchmark's framework ceiling (no-op) and
its ideal handler (busy)."""

import os
import shutil
import subprocess
import sys
import tempfile

import yaml

from bundle import settings
from deploy.archive import shipped_config, write_checksum

HANDLER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "noop_handler.py")


def build_noop_archive(store: str, config_file: str, version: str = "noop") -> str:
    """model_store/<model>_v<version>.mar serving the no-op handler under the bundle's model name."""
    work = tempfile.mkdtemp(prefix="noop-")
    try:
        config_file = shipped_config(config_file, None, os.path.join(work, "model-config.yaml"))  # workers
        subprocess.run(
            [
                os.path.join(os.path.dirname(sys.executable), "torch-model-archiver"),
                *("--model-name", settings.MODEL_NAME, "--version", version),
                *("--handler", HANDLER, "--config-file", config_file, "--export-path", work),
            ],
            check=True,
            env={**os.environ, "TMPDIR": work},  # the archiver wipes $TMPDIR/<model-name>: keep it private
        )
        target = os.path.join(store, f"{settings.MODEL_NAME}_v{version}.mar")
        shutil.move(os.path.join(work, f"{settings.MODEL_NAME}.mar"), target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_checksum(target)
    return target


def build_busy_archive(store: str, config_file: str, busy_file: str) -> str:
    """model_store/<model>_vbusy.mar: the no-op handler that first spends the CPU microseconds per image that
    `busy_file` holds (the bench rewrites it before each row), with config_file's workers and batching."""
    with open(config_file) as f:
        config = yaml.safe_load(f)
    config["handler"] = {"busy_file": os.path.abspath(busy_file)}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(config, f)
        f.flush()
        return build_noop_archive(store, f.name, "busy")
