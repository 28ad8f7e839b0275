"""Two-node training: the unchanged training command under torchrun in two network namespaces joined by a veth
pair (train/multinode.py), gloo over that link; then the checkpoint resumes on one node."""

import json
import os

import psutil
import pytest
import torch

from tests.conftest import cannot_run, require_tool, train_run
from train import multinode
from train.train import state_digest


@pytest.fixture
def namespaces():
    """Network namespaces need iproute2 and root: a missing one skips, or fails under CI (require_tool)."""
    require_tool("ip")
    if os.geteuid() != 0:
        cannot_run("network namespaces need root (.ci/run runs as root)")


TRAIN = ["--epochs", "3", "--stop-after-epoch", "2", "--quiet", "--no-tensorboard", "--no-plots"]


@pytest.mark.slow
def test_two_nodes_train_identical_replicas_then_resume_on_one(namespaces, tmp_path, digits):
    out = tmp_path / "two-nodes"
    tag = f"t{os.getpid() % 10000}"
    results = multinode.run(["--output-dir", str(out), *TRAIN], tag=tag, timeout=600)
    assert multinode.leftovers(tag) == []
    for r in results:
        assert r["returncode"] == 0, f"node {r['node']}:\n{r['output'][-3000:]}"
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["processes"] == 2 and metrics["epochs_done"] == 2
    # One process per node, each reporting a digest of its own parameters after the run: all equal, and equal
    # to what the checkpoint holds.
    replicas = metrics["replicas"]
    assert sorted(r["node"] for r in replicas) == [0, 1]
    saved = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert {r["sha256"] for r in replicas} == {state_digest(saved["model"])}

    train_run(out, "--resume", "auto", "--epochs", "3")  # one node, one process
    resumed = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 3 and [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
    assert state_digest(resumed["model"]) != state_digest(saved["model"])  # it trained on
    with open(out / "metrics.json") as f:
        assert json.load(f)["processes"] == 1


@pytest.mark.slow
def test_killed_run_leaves_no_namespace_or_link(namespaces, tmp_path):
    tag = f"k{os.getpid() % 10000}"
    results = multinode.run(["--output-dir", str(tmp_path / "run"), *TRAIN], tag=tag, timeout=3)
    assert all(r["returncode"] != 0 for r in results)
    assert "killed after 3s" in results[0]["output"]
    assert multinode.leftovers(tag) == []
    # no trainer outlives the run (an orphan would also keep run() waiting on its output pipe)
    assert not [
        p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]


def test_refuses_other_than_two_nodes():
    with pytest.raises(multinode.NodesError, match="exactly two nodes"):
        multinode.make_nodes(3, "x")


def test_main_says_why_it_cannot_make_the_nodes(namespaces):
    with pytest.raises(SystemExit, match="^error: --nnodes: a veth pair joins exactly two nodes$"):
        multinode.main(["--nnodes", "3", "--", "--epochs", "1"])
