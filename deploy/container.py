"""Build and run the bundle's container image (container/Dockerfile); the Python behind scripts/container.sh.

python -m deploy.container base                                   # Debian base from debootstrap (cached)
python -m deploy.container build [--base IMAGE] [--tag TAG] [--bake STORE]
python -m deploy.container run [--tag TAG] [--store DIR] [--port 8080] [--name NAME]
python -m deploy.container header [--name NAME] | curl -H @- ...  # the inference key, read inside the
                                                                  # container
python -m deploy.container rm [--name NAME]

Where no registry is reachable, `base` builds a Debian bookworm image with debootstrap and `docker import`
(cached as bundle-base:bookworm; `build` uses it when --base is not given and the official Python image cannot
be pulled). As root on Debian, docker.io and debootstrap are installed with apt and dockerd is started when
missing. Details and measured times: docs/container.md.
"""

import argparse
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from bundle import settings
from deploy.process import wait_until

BASE = "bundle-base:bookworm"  # the one cached base image (debootstrap); `docker rmi` it to rebuild
OFFICIAL_BASE = "python:3.11-slim-bookworm"  # the Dockerfile's default, for users with a registry
IMAGE = "torchserve-bundle:latest"
NAME = "torchserve-bundle"
DOCKERFILE = os.path.join(settings.ROOT, "container", "Dockerfile")
CA_DIR = os.path.join(settings.ROOT, "container", "ca-certificates")
BAKE_DIR = os.path.join(settings.ROOT, "container", "bake-store")  # staging for --bake (ignored by git)
MIRROR = "http://deb.debian.org/debian"
STORE_IN_IMAGE = "/srv/bundle/model_store"
DOCKERD_LOG = "/var/log/bundle-dockerd.log"


class ContainerError(RuntimeError):
    """Docker, the image or the container could not do what was asked; the message says what to do."""


def docker(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run `docker ARGS` with the legacy builder (Debian's docker.io has no buildx, and it is all the
    Dockerfile needs); the finished process, ContainerError when it fails and `check` is set."""
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        raise ContainerError(f"docker {args[0]} failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


# --- the container runtime ----------------------------------------------------------------------------------


def daemon_answers() -> bool:
    """Whether a docker daemon answers `docker info` (False also without the docker CLI)."""
    try:
        return docker("info", check=False, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def apt_install(*packages: str):
    """Install Debian packages with apt-get; as anyone but root, or without apt-get, ContainerError says what
    to install."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        names = " ".join(packages)
        raise ContainerError(f"install {names} (Debian/Ubuntu: sudo apt-get install -y {names})")
    print(f"installing {' '.join(packages)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env, timeout=900)


def ensure_docker():
    """A docker CLI and a daemon that answers: as root, Debian's docker.io is installed and dockerd
    started."""
    if daemon_answers():
        return
    if shutil.which("dockerd") is None:
        apt_install("docker.io")
    if os.geteuid() != 0:
        raise ContainerError("the docker daemon is not running: start it (sudo systemctl start docker)")
    print(f"starting dockerd (log: {DOCKERD_LOG})", file=sys.stderr)
    with open(DOCKERD_LOG, "ab") as log:
        # a daemon: it outlives this command, as a service would
        subprocess.Popen(
            ["dockerd", "--storage-driver", "overlay2"], stdout=log, stderr=log, start_new_session=True
        )
    wait_until(daemon_answers, 60, "dockerd", interval=1, hint=f"see {DOCKERD_LOG}", error=ContainerError)


def image_exists(tag: str) -> bool:
    """Whether the docker daemon has an image tagged `tag`."""
    return docker("image", "inspect", tag, check=False).returncode == 0


def ensure_base(tag: str = BASE) -> str:
    """A Debian bookworm base image without a registry: debootstrap's minbase piped into `docker import`."""
    ensure_docker()
    if image_exists(tag):
        return tag
    if shutil.which("debootstrap") is None:
        apt_install("debootstrap")
    print(f"building {tag} with debootstrap (about a minute or two)", file=sys.stderr)
    root = tempfile.mkdtemp(prefix="bundle-base-")
    try:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", root, MIRROR],
            check=True,
            capture_output=True,
            timeout=1200,
        )
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        docker("import", "-", tag, stdin=tar.stdout, timeout=600)
        tar.wait()
    except subprocess.CalledProcessError as e:
        raise ContainerError(f"debootstrap failed: {e.stderr.decode(errors='replace')[-2000:]}") from None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tag


# --- build --------------------------------------------------------------------------------------------------


def stage_cas():
    """Behind a TLS-intercepting proxy pip needs its CA: copy this machine's extra CAs into the build
    context."""
    for old in glob.glob(os.path.join(CA_DIR, "*.crt")):
        os.remove(old)
    for crt in glob.glob("/usr/local/share/ca-certificates/**/*.crt", recursive=True):
        shutil.copy(crt, CA_DIR)


def stage_store(store: str) -> str:
    """The archives of `store` copied into the build context (--bake), checked like a mounted store."""
    check_store(store)
    shutil.rmtree(BAKE_DIR, ignore_errors=True)
    os.makedirs(BAKE_DIR)
    for path in glob.glob(os.path.join(store, "*.mar")) + glob.glob(os.path.join(store, "*.mar.sha256")):
        shutil.copy(path, BAKE_DIR)
    return os.path.relpath(BAKE_DIR, settings.ROOT)


def build(tag: str = IMAGE, base: str | None = None, bake: str | None = None, timeout: float = 3600) -> float:
    """Build the image; returns its wall time in seconds. base None: the debootstrap base (built if
    missing)."""
    ensure_docker()
    base = base or ensure_base()
    stage_cas()
    args = ["build", "--force-rm", "-f", DOCKERFILE, "--build-arg", f"BASE={base}", "-t", tag]
    if bake:
        args += ["--build-arg", f"STORE={stage_store(bake)}"]
    t0 = time.time()
    try:
        docker(*args, settings.ROOT, timeout=timeout)
    finally:
        shutil.rmtree(BAKE_DIR, ignore_errors=True)
    return time.time() - t0


# --- run ----------------------------------------------------------------------------------------------------


def check_store(store: str):
    """A model store the container's user (uid 1000) can read, holding my_model.mar."""
    if not os.path.isdir(store):
        raise ContainerError(f"model store {store} does not exist (build archives with scripts/archive.sh)")
    mar = os.path.join(store, f"{settings.MODEL_NAME}.mar")
    if not os.path.isfile(mar):
        raise ContainerError(
            f"model store {store} has no {settings.MODEL_NAME}.mar: TorchServe in the container starts with "
            "it (scripts/archive.sh 1.0 CHECKPOINT writes it)"
        )
    if os.stat(store).st_mode & 0o005 != 0o005 or os.stat(mar).st_mode & 0o004 == 0:
        raise ContainerError(
            f"the container's user (uid 1000) cannot read {store}: chmod o+rx {store} and o+r its archives"
        )


def check_port(port: int):
    """ContainerError unless `port` on 127.0.0.1 is free to publish the container on."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ContainerError(f"port {port} is already in use: choose another with --port") from None


def remove(name: str = NAME) -> bool:
    """Remove container `name` (forced, with its anonymous volumes); False when docker removed none."""
    return docker("rm", "-f", "-v", name, check=False).returncode == 0


def run(
    tag: str = IMAGE,
    store: str | None = settings.MODEL_STORE,
    port: int = 8080,
    name: str = NAME,
    timeout=300,
) -> str:
    """Start the image serving `store` (mounted read-only; None: the archives baked in) with inference
    published on 127.0.0.1:port only; wait until TorchServe is ready. Nothing is left behind when it fails."""
    if store is not None:
        store = os.path.abspath(store)
        check_store(store)
    check_port(port)
    ensure_docker()
    if docker("container", "inspect", name, check=False).returncode == 0:
        raise ContainerError(
            f"a container named {name} exists already: `scripts/container.sh rm --name {name}`"
        )
    mount = ["-v", f"{store}:{STORE_IN_IMAGE}:ro"] if store else []
    try:
        docker("run", "-d", "--init", "--name", name, "-p", f"127.0.0.1:{port}:8080", *mount, tag)
        wait_ready(name, timeout)
    except BaseException:
        remove(name)
        raise
    return name


def wait_ready(name: str, timeout: float):
    """The entry point prints TorchServe's status once every version has a ready worker."""

    def ready() -> bool:
        logs = docker("logs", name, check=False)
        if "TorchServe is running" in logs.stdout:
            return True
        state = docker("inspect", "-f", "{{.State.Status}}", name, check=False).stdout.strip()
        if state not in ("created", "running"):
            raise ContainerError(f"container {name} {state}:\n{(logs.stdout + logs.stderr)[-3000:]}")
        return False

    wait_until(
        ready, timeout, f"container {name}", interval=2, hint=f"docker logs {name}", error=ContainerError
    )


def exec_in(name: str, *cmd: str, timeout: float = 300) -> str:
    """Run `cmd` inside the running container `name`; its stdout, ContainerError when it fails."""
    return docker("exec", name, *cmd, timeout=timeout).stdout


def header(name: str = NAME) -> dict:
    """The inference Authorization header, read inside the container (the key never leaves it otherwise)."""
    key, value = exec_in(name, "scripts/serve.sh", "header").strip().split(": ", 1)
    return {key: value}


def main(argv=None):
    """The command line (see the module docstring): do one action and print its result; SystemExit with the
    error."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["base", "build", "run", "header", "rm"])
    p.add_argument("--tag", default=IMAGE, help="image to build or run")
    p.add_argument("--base", default=None, help=f"base image for build; default {BASE} (debootstrap, cached)")
    p.add_argument("--bake", default=None, metavar="STORE", help="build: bake this model store's archives in")
    p.add_argument("--store", default=settings.MODEL_STORE, help="run: model store to mount (read-only)")
    p.add_argument("--baked", action="store_true", help="run: mount nothing, serve the archives baked in")
    p.add_argument("--port", default=8080, type=int, help="run: host port for inference (on 127.0.0.1)")
    p.add_argument("--name", default=NAME, help="container name")
    args = p.parse_args(argv)
    try:
        if args.action == "base":
            print(ensure_base())
        elif args.action == "build":
            seconds = build(args.tag, args.base, args.bake)
            print(f"built {args.tag} in {seconds:.0f} s")
        elif args.action == "run":
            run(args.tag, None if args.baked else args.store, args.port, args.name)
            print(
                f"{args.name}: inference on http://127.0.0.1:{args.port} (scripts/container.sh "
                "header | curl -H @-)"
            )
        elif args.action == "header":
            for k, v in header(args.name).items():
                print(f"{k}: {v}")
        elif args.action == "rm":
            print(f"removed {args.name}" if remove(args.name) else f"no container {args.name}")
    except ContainerError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
