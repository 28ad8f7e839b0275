"""Shared fixtures. Paths come from bundle.settings, so the tests run from any working directory
(pyproject.toml puts the repository root on sys.path)."""

import itertools
import os
import shutil
import socket

import pytest

from bundle.settings import ROOT  # noqa: F401  (tests import it from here)


def require_tool(name: str) -> str:
    """The path of an executable the test needs. Missing, the test skips, except under CI (`.ci/run` sets
    CI=1, and scripts/setup.sh installs the tools there), where it fails: a CI run never goes green by
    skipping."""
    path = shutil.which(name)
    if path:
        return path
    cannot_run(f"{name} not found on PATH: scripts/setup.sh installs it (as root), or apt-get install it")


def cannot_run(why: str):
    """Skip a test this machine cannot run (no tool, not root, no service user), or fail it under CI, which
    runs as root with the tools installed: a CI run never goes green by skipping."""
    if os.environ.get("CI"):
        pytest.fail(f"CI: {why}", pytrace=False)
    pytest.skip(why)


# --- test order ---------------------------------------------------------------------------------
# pytest-randomly shuffles modules and the tests in each; a module whose tests build on each other's effects
# says so with `pytest.mark.in_order` and keeps its file order (its place among the modules is still random).

COLLECTED = pytest.StashKey[int]()
_collected = itertools.count()


def pytest_itemcollected(item):
    item.stash[COLLECTED] = next(_collected)  # file order, before any plugin reorders


def pytest_collection_modifyitems(items):
    """Put the tests of each `in_order` module back in file order, in the slots the shuffle gave them."""
    slots: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        if item.get_closest_marker("in_order"):
            slots.setdefault(item.nodeid.split("::")[0], []).append(i)
    for positions in slots.values():
        ordered = sorted((items[i] for i in positions), key=lambda item: item.stash[COLLECTED])
        for i, item in zip(positions, ordered):
            items[i] = item


def free_port() -> int:
    """A port the OS says is free right now (for torchrun's rendezvous, a container's published port, ...)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def digits():
    """The bundled default dataset (written once, deterministic)."""
    from train.data import DIGITS_DIR, write_digits

    return write_digits(DIGITS_DIR)


@pytest.fixture(scope="session")
def png(digits):
    """A real validation image of a 3 (PNG bytes)."""
    val3 = os.path.join(digits, "val", "3")
    with open(os.path.join(val3, sorted(os.listdir(val3))[0]), "rb") as f:
        return f.read()


def train_run(out_dir, *extra):
    """Run train.main in-process with a shrunk recipe; returns the output dir."""
    import sys

    from train import train

    argv = ["--output-dir", str(out_dir), "--quiet", "--no-tensorboard", "--no-plots", *map(str, extra)]
    saved, sys.argv = sys.argv, [train.__file__, *argv]  # what `python -m train.train ...` would see
    try:
        train.main(train.get_args_parser().parse_args(argv))
    finally:
        sys.argv = saved
    return str(out_dir)


@pytest.fixture(scope="session")
def trained(digits, tmp_path_factory):
    """A model trained for 3 epochs on all digits (~15 s): good enough to tell digits apart (>0.9)."""
    return train_run(tmp_path_factory.mktemp("run") / "small", "--epochs", 3)


@pytest.fixture(scope="session")
def checkpoint(trained):
    return os.path.join(trained, "checkpoint_best.pt")


@pytest.fixture(scope="session")
def exported(checkpoint, tmp_path_factory):
    """All four serving formats of the small model, checked against eager."""
    from train.export import export_all

    out = tmp_path_factory.mktemp("export") / "all"
    export_all(checkpoint, str(out))
    return str(out)


# --- real TorchServe ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def archive_factory(checkpoint, tmp_path_factory):
    """build(version, backend='eager', checkpoint=None) -> path of a .mar in a shared cache dir.

    Archives are cached per (version, backend, checkpoint), so each is built once per session.
    """
    from deploy.archive import archive_checkpoint

    cache_root = tmp_path_factory.mktemp("archives")
    built = {}

    def build(version, backend="eager", ckpt=None, model_name="my_model"):
        key = (version, backend, ckpt or checkpoint, model_name)
        if key not in built:
            out = cache_root / f"{len(built)}" / f"{model_name}_v{version}.mar"
            out.parent.mkdir()
            built[key] = archive_checkpoint(
                ckpt or checkpoint, version, backend, model_name=model_name, output=str(out)
            )["archive"]
        return built[key]

    return build


def install_archive(archive, store, name=None):
    """Copy an archive and its .sha256 into a model store (under `name`, keeping the checksum valid)."""
    import shutil

    from deploy.archive import write_checksum

    target = os.path.join(str(store), name or os.path.basename(archive))
    shutil.copyfile(archive, target)
    write_checksum(target)
    return target


def batching_store(tmp, checkpoint):
    """A model store in `tmp` holding my_model 1.0 (eager) with batchSize 8 and a 200 ms batch window, so that
    concurrent requests share batches (with their bad neighbours)."""
    import yaml

    from bundle.settings import MODEL_CONFIG
    from deploy.archive import archive_checkpoint

    cfg = yaml.safe_load(open(MODEL_CONFIG))
    cfg.update(batchSize=8, maxBatchDelay=200)
    (tmp / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    store = tmp / "store"
    store.mkdir()
    archive_checkpoint(
        checkpoint,
        "1.0",
        "eager",
        output=str(store / "my_model.mar"),
        config_file=str(tmp / "model-config.yaml"),
    )
    return store


def served_version(ts, body: bytes, version: str | None = None, model: str = "my_model") -> str:
    """Which version answered a prediction, read from the answer itself: a KServe v2 request's answer carries
    the worker's model_version (versions with the same weights give the same label, so a label proves
    nothing)."""
    import base64

    v2 = {"id": "which", "inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES"}]}
    v2["inputs"][0]["data"] = [base64.b64encode(body).decode()]
    path = f"/predictions/{model}" + (f"/{version}" if version else "")
    resp = ts.request("POST", "inference", path, json=v2)
    assert resp.status_code == 200, resp.text[:300]
    return resp.json()["model_version"]


@pytest.fixture(scope="module")
def torchserve_factory(tmp_path_factory):
    """start(store, overrides=None, models=...) -> a running TorchServe on free ports (own workdir, TMPDIR,
    key file and logs, so a demo server on 8080-8082 is untouched); every one is stopped when the module ends,
    whatever happened."""
    from deploy.server import Ports, TorchServe

    started = []

    def start(store, overrides=None, models="my_model=my_model.mar", workdir=None):
        ts = TorchServe(
            workdir=str(workdir or tmp_path_factory.mktemp("ts")),
            model_store=str(store),
            ports=Ports.free(),
            overrides=overrides or {},
            # pytest's folders are private to root; test_security.py starts one as the service user
            user=None,
        )
        started.append(ts)
        ts.start(models=models)
        return ts

    yield start
    for ts in started:
        ts.stop()


@pytest.fixture(scope="module")
def store(tmp_path_factory, archive_factory):
    """A model store holding my_model.mar (version 1.0, eager) for one test module."""
    store = tmp_path_factory.mktemp("store")
    install_archive(archive_factory("1.0"), store, "my_model.mar")
    return store


@pytest.fixture(scope="module")
def server(store, torchserve_factory):
    """TorchServe serving `store` with my_model 1.0, shared by one test module."""
    return torchserve_factory(store)
