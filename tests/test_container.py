"""The container image (container/Dockerfile): built here from the debootstrapped base, run as a non-root user
with tokens on, predicted through the published inference port with the key read inside the container, a
second version registered through management inside it, the archives baked in, KServe's runtime command in the
image, and bad input refused with nothing left behind.

Marked `container` (deselected by default in pyproject.toml; 8 min 18 s here, 5.5 min of it building the
image):
    scripts/test.sh -m container tests/test_container.py
"""

import os
import socket
import subprocess
import time

import pytest
import requests

from deploy import container, kserve
from tests.conftest import ROOT, free_port, install_archive

# The image build alone takes ~8 min on 2 cores: more than the suite's 900 s per test once training runs too.
pytestmark = [pytest.mark.slow, pytest.mark.container, pytest.mark.timeout(3600)]
TAG = f"torchserve-bundle:test-{os.getpid()}"


def leftovers(prefix: str) -> list[str]:
    out = container.docker("ps", "-a", "--filter", f"name={prefix}", "--format", "{{.Names}}").stdout
    return out.split()


@pytest.fixture(scope="module")
def image():
    """The image built from the cached debootstrap base; removed (with its layers) when the module ends."""
    container.ensure_docker()
    seconds = container.build(TAG)
    size = int(container.docker("image", "inspect", "-f", "{{.Size}}", TAG).stdout)
    print(f"\nbuilt {TAG} in {seconds:.0f} s, {size / 1e9:.2f} GB")  # for docs/container.md
    yield TAG
    container.docker("rmi", "-f", TAG, check=False)


@pytest.fixture(scope="module")
def readable_store(tmp_path_factory, archive_factory):
    """my_model 1.0 and 2.0, readable by the container's uid 1000 (pytest's own folders are root's, 0700)."""
    store = tmp_path_factory.mktemp("cstore")
    install_archive(archive_factory("1.0"), store, "my_model.mar")
    install_archive(archive_factory("2.0"), store, "my_model_v2.0.mar")
    for path in [store, *store.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return store


@pytest.fixture
def started(image):
    """start(store) -> (name, port); every container started is removed afterwards, whatever happened."""
    names = []

    def start(store):
        name, port = f"bundle-test-{os.getpid()}-{len(names)}", free_port()
        names.append(name)
        t0 = time.time()
        container.run(image, store and str(store), port, name)
        print(f"\n{name} ready in {time.time() - t0:.1f} s")
        return name, port

    yield start
    for name in names:
        container.remove(name)
    assert leftovers(f"bundle-test-{os.getpid()}") == []


def predict(port, png, version="", headers=None):
    url = f"http://127.0.0.1:{port}/predictions/my_model" + (f"/{version}" if version else "")
    return requests.post(url, data=png, headers=headers or {}, timeout=60)


def test_mounted_store_predict_register_as_non_root(started, readable_store, png):
    name, port = started(readable_store)
    assert predict(port, png).status_code == 400  # tokens on: no key, no answer
    key = container.header(name)  # read inside the container
    answer = predict(port, png, headers=key)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()) == 5 and set(answer.json()) <= {str(d) for d in range(10)}

    t0 = time.time()
    out = container.exec_in(
        name, "scripts/register_version.sh", f"{container.STORE_IN_IMAGE}/my_model_v2.0.mar"
    )
    print(f"\nregistered 2.0 in {time.time() - t0:.1f} s")
    assert "registered my_model 2.0" in out
    assert predict(port, png, "2.0", headers=key).status_code == 200
    listing = container.exec_in(name, "scripts/register_version.sh", "list")
    assert {tuple(line.split()[:2]) for line in listing.splitlines()} >= {
        ("my_model", "1.0"),
        ("my_model", "2.0"),
    }

    assert container.exec_in(name, "id", "-u").strip() == "1000"
    ports = container.docker("port", name).stdout
    assert ports.strip().splitlines() == [f"8080/tcp -> 127.0.0.1:{port}"]  # management is not published
    health = container.docker("inspect", "-f", "{{.Config.Healthcheck.Test}}", name).stdout
    assert "/ping" in health


def test_baked_store_serves_without_a_mount(image, readable_store, png):
    baked, name = f"{TAG}-baked", f"bundle-test-{os.getpid()}-baked"
    try:
        seconds = container.build(baked, bake=str(readable_store))  # only the last layers differ: build cache
        print(f"\nbuilt {baked} in {seconds:.0f} s")
        port = free_port()
        container.run(baked, None, port, name)
        assert predict(port, png, headers=container.header(name)).status_code == 200
    finally:
        container.remove(name)
        container.docker("rmi", "-f", baked, check=False)


def test_image_runs_kserve_runtime_command(image, readable_store, tmp_path, png):
    """The image as KServe's TorchServe runtime starts it: the generated layout mounted at /mnt/models."""
    layout = kserve.write_layout(str(readable_store), str(tmp_path / "kserve"))
    for path in [tmp_path, *(tmp_path / "kserve").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    name, port = f"bundle-test-{os.getpid()}-kserve", free_port()
    try:
        container.docker(
            "run", "-d", "--init", "--name", name, "-p", f"127.0.0.1:{port}:8080",
            "-e", "TS_INFERENCE_ADDRESS=http://0.0.0.0:8080", "-v", f"{layout['storage']}:/mnt/models:ro",
            image, *kserve.RUNTIME_ARGS,
        )  # fmt: skip
        kserve.wait_ready(f"http://127.0.0.1:{port}", timeout=180)
        assert predict(port, png).status_code == 200  # tokens off here (docs/kserve.md)
    finally:
        container.remove(name)


def test_bad_input_clear_message_nothing_left(image, tmp_path, readable_store):
    prefix = f"bundle-bad-{os.getpid()}"
    with pytest.raises(container.ContainerError, match="does not exist"):
        container.run(image, str(tmp_path / "missing"), free_port(), f"{prefix}-0")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(container.ContainerError, match="has no my_model.mar"):
        container.run(image, str(empty), free_port(), f"{prefix}-1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(container.ContainerError, match="already in use"):
            container.run(image, str(readable_store), taken.getsockname()[1], f"{prefix}-2")
    # The image itself, run by hand without a store: a clear message and exit 2.
    proc = container.docker("run", "--rm", "--name", f"{prefix}-3", image, check=False, timeout=120)
    assert proc.returncode == 2 and "no model_store/my_model.mar" in proc.stderr
    # The shell door: same message, non-zero exit.
    door = subprocess.run(
        [
            os.path.join(ROOT, "scripts", "container.sh"),
            "run",
            "--store",
            str(empty),
            "--name",
            f"{prefix}-4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert door.returncode != 0 and "has no my_model.mar" in door.stderr
    assert leftovers(prefix) == []
