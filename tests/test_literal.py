"""TorchServe's own commands, typed as the docs write them: `torchserve --start --models
my_model=my_model.mar` in a clean shell with only the venv activated, then every curl line of
docs/serving.md's block.

The block runs as written but for three things: its ports (free ones, so a demo server on 8080-8082 is
untouched) and its model store (a private one), which both come from TS_CONFIG_FILE, the variable the venv's
activate script exports (so the test uses the same mechanism as a user's shell), and the start line's output
(TorchServe's log), which goes to a file."""

import json
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from bundle.settings import ROOT
from deploy.server import Ports
from model_src.cores import split_cores, usable_cores
from tests.conftest import install_archive

# in_order: the tests share one module-scoped server (or door) and build on each other's effects
pytestmark = [pytest.mark.slow, pytest.mark.torchserve, pytest.mark.in_order]

DOCS = os.path.join(ROOT, "docs", "serving.md")
VENV_CONFIG = os.path.join(ROOT, ".venv", "torchserve.config.properties")
MARKER = "@@@ line done"


def documented_lines() -> list[str]:
    text = open(DOCS).read()
    block = re.search(r"<!-- literal-commands.*?```bash\n(.*?)```", text, re.S)
    assert block, "docs/serving.md lost its literal-commands block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def wait_until_refused(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.5)
    return False


def test_the_activate_script_points_torchserve_at_this_bundles_config():
    activate = open(os.path.join(ROOT, ".venv", "bin", "activate")).read()
    assert f'export TS_CONFIG_FILE="{VENV_CONFIG}"' in activate
    props = dict(line.split("=", 1) for line in open(VENV_CONFIG).read().splitlines() if "=" in line[:60])
    assert props["model_store"] == os.path.join(ROOT, "model_store")
    assert props["inference_address"] == "http://127.0.0.1:8080"
    assert props["disable_token_authorization"] == "false"
    assert props["vmargs"] == f"-Dlog4j.configurationFile={ROOT}/serving/log4j2.xml"  # the frontend's logging


@pytest.fixture
def shell(tmp_path, archive_factory):
    """A working directory like the repository root (its .venv and data), a private model store holding
    my_model 1.0 and 2.0, and a copy of the venv's TorchServe config on free ports."""
    store = tmp_path / "model_store"
    store.mkdir()
    install_archive(archive_factory("1.0"), store, "my_model.mar")
    install_archive(archive_factory("2.0"), store, "my_model_v2.0.mar")
    work = tmp_path / "root"
    work.mkdir()
    for name in (".venv", "data"):
        os.symlink(os.path.join(ROOT, name), work / name)
    ports = Ports.free()
    config = open(VENV_CONFIG).read()
    for default, port in zip((8080, 8081, 8082, 7070, 7071), vars(ports).values()):
        config = re.sub(rf"\b{default}\b", str(port), config)
    config = re.sub(r"(?m)^model_store=.*$", f"model_store={store}", config)
    (tmp_path / "ts.properties").write_text(config)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp_path),  # TorchServe's pid file: `torchserve --stop` finds this server only
    }
    yield work, env, ports, tmp_path / "ts.properties"
    subprocess.run(
        [
            "bash",
            "-c",
            f"source .venv/bin/activate && TS_CONFIG_FILE={tmp_path}/ts.properties torchserve --stop",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        timeout=60,
    )


def test_the_documented_commands_work_as_typed(shell):
    work, env, ports, config = shell
    lines = documented_lines()
    assert (
        lines[0] == "source .venv/bin/activate"
        and lines[1] == "torchserve --start --models my_model=my_model.mar"
    )
    script = ["set -u", lines[0], f"export TS_CONFIG_FILE={config}  # the test's ports and store"]
    for line in lines[1:]:
        # the frontend keeps logging to the shell's stdout: not here
        if line.startswith("torchserve --start"):
            line += f" > {config.parent}/start.log 2>&1"
        line = line.replace("127.0.0.1:8080", f"127.0.0.1:{ports.inference}")
        script += [line.replace("127.0.0.1:8081", f"127.0.0.1:{ports.management}"), f"echo '{MARKER}'"]
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    outputs = dict(zip(lines[1:], done.stdout.split(MARKER + "\n")))

    def answer(fragment):
        (line,) = [line for line in outputs if fragment in line]
        return json.loads(outputs[line])

    assert next(iter(answer("/predictions/my_model"))) == "3"
    explained = answer("/explanations/my_model")
    assert explained["class"] == "3" and len(explained["attributions"]) == 16
    assert "registered" in answer("models?url=my_model_v2.0.mar")["status"]
    assert "Default version" in answer("set-default")["status"]
    listed = json.loads(outputs[next(line for line in outputs if line.endswith("8081/models"))])
    assert [m["modelName"] for m in listed["models"]] == ["my_model"]
    described = answer("customized=true")[0]
    card = described["customizedMetadata"]
    assert card["version"] == "2.0" and card["archive"]["file"] == "my_model_v2.0.mar"
    # Registered with initial_workers=1, it has the archive's model-config.yaml workers (model_src/cores.py's
    # rule: 2 on 2 cores), as docs/serving.md now says (it said the management API's parameters win over it).
    workers = split_cores(usable_cores()).workers
    assert (described["minWorkers"], described["maxWorkers"], len(described["workers"])) == (workers,) * 3
    said = " ".join(open(DOCS).read().split("## Batching and workers", 1)[1].split("\n\n", 2)[1].split())
    assert "`minWorkers`/`maxWorkers` also win over a registration's `initial_workers`" in said
    assert "initial_workers=1" in said and "comes up with 2 workers" in said
    assert "unregistered" in answer("-X DELETE")["status"]
    # `torchserve --stop` in the block stopped it (it returns before the frontend has exited): soon nothing
    # answers
    assert wait_until_refused(ports.inference, seconds=60)
    shutil.rmtree(work / "logs", ignore_errors=True)
