"""The front door: HAProxy (Debian's package) in front of TorchServe's inference API.

TorchServe stays on 127.0.0.1; only the front door listens beyond loopback, and only with TLS. It
  - terminates TLS with a certificate from a local CA it generates once (ca.crt is what clients trust),
    or with a real one (`cert=`, one PEM file: the chain, then the key, as HAProxy reads it);
  - keeps at most `maxconn` requests inside TorchServe (keep-alive connections) and queues the rest
    itself: TorchServe past its own job queue spends its cores turning requests away (docs/frontdoor.md);
  - answers at once 503 + Retry-After + a JSON message when its queue holds `queue` requests, or when a
    request waited `queue_timeout` s, and 429 when a client sends more than `rate` requests/s (0: off);
  - refuses a body longer than TorchServe's max_request_size (413) or without a length (411), a media type
    the handler does not read (415: url-encoded forms) and the API description (404) before TorchServe sees
    it;
  - protects TorchServe from slow and many clients: `per_source` connections per address, a deadline for the
    handshake, the head and the body (held whole before the request is queued: 408), idle keep-alive closed;
  - gives explanations (seconds each) and bodies too large to hold (they stream) their own lanes, each with
    its own small cap and queue, so neither can take the slots predictions need;
  - writes an access log line per request with its latency (frontdoor/access.log).
Its files live in settings.FRONT_DOOR_DIR (0700), not in server/: that folder belongs to the service user
that runs model code, which must not read the TLS keys.

This module writes the certificates and files and runs HAProxy; deploy/haproxy_config.py renders its
configuration from the settings (FrontDoor's fields).
scripts/serve.sh start --front-door starts it with TorchServe (deploy/serve.py); stop and status include it.
"""

import contextlib
import glob
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field

import psutil

from bundle import settings
from deploy import process
from deploy.haproxy_config import CANARY_MAP
from deploy.haproxy_oip import OipConfig
from deploy.mar import read_bundle, read_manifest
from deploy.privileges import private_files
from model_src.oip import metadata_text, model_metadata


def local_names() -> list[str]:
    """What clients may call this machine: localhost, its host name and every IPv4 address it has now."""
    addrs = [a.address for nics in psutil.net_if_addrs().values() for a in nics if a.family == socket.AF_INET]
    return ["localhost", socket.gethostname(), *addrs]


@dataclass
class FrontDoor(OipConfig):
    """HAProxy before TorchServe's inference port: its certificates, files and process (the settings and
    the configuration they render: HaproxyConfig, OipConfig)."""

    names: list[str] = field(default_factory=local_names)  # the generated certificate's subjectAltName

    ca = property(lambda self: self.path("ca.crt"))  # give this to curl --cacert / requests verify=
    config = property(lambda self: self.path("haproxy.cfg"))
    log = property(lambda self: self.path("access.log"))
    pid_file = property(lambda self: self.path("haproxy.pid"))

    def url(self, host: str = "localhost") -> str:
        """The door's HTTPS address as a client on `host` calls it."""
        return f"https://{host}:{self.port}"

    # --- certificates ---------------------------------------------------------------------------------
    def write_certs(self):
        """A local CA (kept across restarts, so clients keep trusting it) and a server certificate for
        self.names, issued again whenever the names change."""
        if self.cert:
            return
        with private_files():
            self.issue()

    def issue(self):
        """Generate the CA if there is none, and the server certificate when self.names changed."""
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        if not os.path.exists(self.ca):
            openssl(
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-days", "3650", "-keyout", self.path("ca.key"), "-out", self.ca,
                "-subj", "/CN=TorchServe bundle local CA",
            )  # fmt: skip
        san = ",".join(f"IP:{n}" if is_ip(n) else f"DNS:{n}" for n in dict.fromkeys(self.names))
        if os.path.exists(self.pem) and read(self.path("server.san")) == san:
            return
        with open(self.path("server.ext"), "w") as f:
            f.write(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
        key, csr, crt = self.path("server.key"), self.path("server.csr"), self.path("server.crt")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
                "-out", csr, "-subj", "/CN=localhost")  # fmt: skip
        openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.path("ca.key"), "-CAcreateserial",
                "-days", "397", "-extfile", self.path("server.ext"), "-out", crt)  # fmt: skip
        with open(self.pem, "w") as f:  # HAProxy reads the certificate and its key from one file
            f.write(read(crt) + read(key))
        with open(self.path("server.san"), "w") as f:
            f.write(san)

    def write_oip(self):
        """The metadata files the config names (HAProxy reads them at start, before it drops to its user)."""
        for name, meta in self.models.items():
            with private_files(), open(self.oip_file(name), "w") as f:
                # HAProxy refuses a `return ... file` that does not fit its buffer less tune.maxrewrite, and
                # the answer's headers share it: half the buffer leaves room (1,000 ImageNet labels: ~14 KB)
                f.write(metadata_text(meta, self.buffer // 2))

    def write_config(self):
        """Write haproxy.cfg, its v2 metadata files and an empty canary map; raises
        FrontDoorError when HAProxy's own check refuses the config."""
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        self.write_oip()
        with private_files(), open(self.path(CANARY_MAP), "w"):
            # empty at every start: a restarted door splits nothing (a canary's controller sees it and stops)
            pass
        with private_files(), open(self.config, "w") as f:
            f.write(self.haproxy_config())
        check = subprocess.run([haproxy(), "-c", "-q", "-f", self.config], capture_output=True, text=True)
        if check.returncode != 0:
            raise FrontDoorError(f"HAProxy refuses {self.config}:\n{check.stdout}{check.stderr}")

    # --- process ----------------------------------------------------------------------------------------
    def pid(self) -> int | None:
        """The pid of this door's HAProxy (found by its pid file and config path), or None."""
        proc = process.find_by_pid_file(self.pid_file, self.config, name="haproxy")
        return proc.pid if proc else None

    def is_running(self) -> bool:
        """Whether this door's HAProxy is running."""
        return self.pid() is not None

    def start(self, timeout: float = 20):
        """Write certificates and config, start HAProxy in its own session and wait until it listens;
        returns self, raises FrontDoorError (and stops it) when it exits or does not listen in `timeout` s."""
        if self.is_running():
            raise FrontDoorError(f"the front door is already running (pid {self.pid()}); stop it first")
        with private_files():
            self.write_certs()
            self.write_config()
            # Foreground (-db) so that its log goes to stdout, which is our access log; its own session, so
            # that it outlives serve.sh.
            with open(self.log, "ab") as log:
                proc = subprocess.Popen(
                    [haproxy(), "-db", "-f", self.config],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            process.write_pid(self.pid_file, proc.pid)

        def up() -> bool:
            if proc.poll() is not None:
                raise FrontDoorError(f"HAProxy exited ({proc.returncode}):\n{tail(self.log)}")
            return listening("127.0.0.1" if self.bind == "0.0.0.0" else self.bind, self.port)

        try:
            process.wait_until(up, timeout, f"HAProxy on {self.bind}:{self.port}", 0.1, error=FrontDoorError)
        except FrontDoorError:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10) -> bool:
        """Stop HAProxy (SIGTERM, SIGKILL after `timeout` s); False when it was not running."""
        pid = self.pid()
        if pid is None:
            return False
        process.terminate([psutil.Process(pid)], timeout, 5)
        process.remove_pid_file(self.pid_file)
        folder = os.path.dirname(self.tee_socket)
        if folder != self.folder:  # /run's folder for a shadow run's tee (root's alone: deploy/shadow_tee.py)
            with contextlib.suppress(OSError):  # a tee that stopped took its socket already
                os.unlink(self.tee_socket)
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        return True


class FrontDoorError(RuntimeError):
    """The front door could not be configured, started or found (HAProxy, openssl)."""


def for_server(ts, **kw) -> FrontDoor:
    """The front door of a TorchServe object: its inference port, its max_request_size and response
    timeout."""
    props = ts.config()
    max_body = int(props.get("max_request_size", 6553500))
    server_timeout = int(props.get("default_response_timeout", 120)) + 30
    kw.setdefault("models", oip_models(ts.model_store))
    # the gRPC listener: only with the OIP gRPC proxy
    kw.setdefault("grpc_backend", ts.ports.oip_grpc if ts.oip_grpc else 0)
    return FrontDoor(backend=ts.ports.inference, max_body=max_body, server_timeout=server_timeout, **kw)


# --- KServe v2 model metadata, from the archives in a model store -------------------------------------------
# model names and versions written into HAProxy's config
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def oip_models(store: str) -> dict[str, dict]:
    """{model name: its KServe v2 metadata} for every archive in `store` (versions in archive order).
    Only a store that no other user can write is read: root opens these files."""
    info = os.stat(store)
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        return {}
    found: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(store, "*.mar"))):
        try:
            model = read_manifest(path)["model"]
            name, version = model["modelName"], model["modelVersion"]
            bundle = read_bundle(path)
            meta = model_metadata(name, [], bundle.class_names, bundle.preprocessing)
        except Exception as e:  # a foreign or broken archive must not stop the door; the guard refuses it
            print(f"warning: {os.path.basename(path)} has no v2 metadata: {e!r:.200}", file=sys.stderr)
            continue
        if not all(isinstance(v, str) and SAFE_NAME.fullmatch(v) for v in (name, version)):
            continue
        meta = found.setdefault(name, meta)
        meta["versions"].append(version)
    return found


def print_status(door: FrontDoor):
    """Print where a running door listens, its caps, its log and a curl line; nothing when down."""
    if not door.is_running():
        return
    rel = os.path.relpath(door.ca)
    print(f"Front door is running (pid {door.pid()}): {door.url()} -> 127.0.0.1:{door.backend}")
    print(
        f"  TLS CA {rel}; at most {door.maxconn} requests in TorchServe, {door.queue} queued (then 503); "
        f"explanations: {door.explain_maxconn} at once, {door.explain_queue} queued"
    )
    if door.grpc_backend:
        grpc = f"{door.bind}:{door.grpc_port} (TLS, HTTP/2) -> 127.0.0.1:{door.grpc_backend}"
        print(f"  KServe v2 gRPC: {grpc}")
    print(f"  access log {os.path.relpath(door.log)}")
    url = f"{door.url()}/predictions/{settings.MODEL_NAME}"
    print(f"  try: scripts/serve.sh header | curl -H @- --cacert {rel} -T IMAGE {url}")


# --- helpers --------------------------------------------------------------------------------------------
def haproxy() -> str:
    """The path of the haproxy binary; raises FrontDoorError when it is not installed."""
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if not path:
        raise FrontDoorError("haproxy not found: run scripts/setup.sh as root, or apt-get install haproxy")
    return path


def openssl(*args: str):
    """Run `openssl ARGS`; raises FrontDoorError with its stderr's tail when it fails."""
    out = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise FrontDoorError(f"openssl {args[0]} failed: {out.stderr.strip()[-500:]}")


def read(path: str) -> str:
    """The text of a file, "" when it does not exist."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def tail(path: str, lines: int = 20) -> str:
    """The last `lines` lines of a file ("" when it does not exist)."""
    return "".join(read(path).splitlines(keepends=True)[-lines:])


def is_ip(name: str) -> bool:
    """Whether `name` is an IPv4 or IPv6 address rather than a host name."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def listening(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port is accepted within 1 s."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0
