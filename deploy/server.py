"""One TorchServe instance: its generated config, its process, its keys and authenticated requests.

One `TorchServe` object describes one instance: a folder, a model store and five ports. The demo
server uses server/ and the ports of config.properties; tests make their own instance in a temporary
directory on free ports. The folder holds:

    run/    root's (0750, group: the server's user): the generated config TorchServe reads
    home/   the server's user's (0700), TorchServe's working directory: key_file.json, logs/ (its logs,
            snapshots, torchserve.out, guard.log), tmp/ (TMPDIR: its pid file, worker sockets, unpacked
            models)
    state/  root's: the deployment history (deploy/versions.py)

The folder itself is root's (0711). Started as root, TorchServe runs as the unprivileged
settings.SERVICE_USER, which owns home/ and can read, not write, the model store; its handlers are code, so
whatever lies in home/ is that user's to plant. Root therefore never writes, walks or chowns inside home/:
it creates home/ empty and chowns that folder alone; whatever must be made inside (logs/, tmp/, the output
logs) is made by a child running as that user; what root reads there (key file, pid file, logs) it opens
without following links; and it signals only processes of that user whose command line is TorchServe's,
and stops TorchServe by running `torchserve --stop` as that user.

TorchServe's gRPC management port cannot be turned off and registers any model directory: started by root,
the server gets an nftables table (deploy/firewall.py) that lets only root and its user connect to it.

What the server writes is never readable by other users: it starts under umask 077
(TorchServe creates key_file.json with the process umask and tightens it only
afterwards).

Restarts keep the deployment: `start` writes into the generated config the
`model_snapshot` that deploy/snapshot.py builds from the journal of deployment
intent and TorchServe's own snapshots (which TorchServe ignores when --ts-config
is given), every archive checked first.

The command line for this lives in deploy/serve.py (scripts/serve.sh); the
management API's calls live in deploy/management.py.
"""

import io
import json
import logging
import os
import pwd
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field

import psutil
import requests

from bundle import settings
from bundle.properties import format_properties, parse_properties, read_properties
from bundle.settings import GUARD_KEY, OIP_GRPC_KEY, Ports
from bundle.settings import ports as ports_from_config
from deploy import firewall, guard, management, oip_grpc_launch, process
from deploy.errors import ServerError
from deploy.privileges import (
    ids,
    logged,
    open_below,
    service_user,
    write_new,
)
from deploy.server_api import KeyedApi
from deploy.server_home import ServerHome
from deploy.snapshot import restore_plan

log = logging.getLogger(__name__)  # the CLIs' stderr (Python's last-resort handler)

DEFAULT_MODELS = f"{settings.MODEL_NAME}={settings.MODEL_NAME}.mar"
FRONTEND = "org.pytorch.serve.ModelServer"  # on the command line of TorchServe's frontend (its JVM)


@dataclass
class TorchServe(KeyedApi, ServerHome):
    """One TorchServe instance (see the module docstring): its folder, model store, ports and config, and the
    calls that start, stop and talk to it."""

    workdir: str = settings.SERVER_DIR
    model_store: str = settings.MODEL_STORE
    ports: Ports = field(default_factory=ports_from_config)
    base_config: str = settings.CONFIG
    overrides: dict = field(default_factory=dict)  # extra config.properties keys
    host: str = "127.0.0.1"  # where clients find the inference API (management and metrics stay on loopback)
    scheme: str = "http"  # of the inference API as clients reach it (https through a front door)
    user: str | None = field(default_factory=lambda: service_user())  # None: the caller's own user
    guard: bool = True  # management through deploy/guard.py (registers checked archives only)
    # Read once per server process and re-read only when TorchServe refuses a key: reading the pid file,
    # the process table, two configs and the key file on every request cost 1.2-2.7 ms per call.
    _tokens: bool | None = field(default=None, init=False, repr=False)
    _keys: dict | None = field(default=None, init=False, repr=False)
    lease_token: str | None = field(default=None, init=False, repr=False)  # while a canary holds its lease

    # --- paths: everything the server writes lies in its folder (see the module's docstring) ----------------
    def path(self, *parts: str) -> str:
        """A path inside the server's folder."""
        return os.path.join(self.workdir, *parts)

    run_dir = property(lambda self: self.path("run"))  # root's
    home = property(lambda self: self.path("home"))  # the server's user's: TorchServe's working directory
    log_dir = property(lambda self: self.path("home", "logs"))
    key_file = property(lambda self: self.path("home", "key_file.json"))  # TorchServe writes it to its cwd
    # TMPDIR: pid file, worker sockets, unpacked models
    tmp_dir = property(lambda self: self.path("home", "tmp"))
    generated_config = property(lambda self: self.path("run", "generated.config.properties"))
    lease_file = property(lambda self: self.path("run", "canary.lease"))  # deploy/canary_lease.py
    management_socket = property(lambda self: self.path("home", "tmp", "mgmt.sock"))
    # tempfile.gettempdir() of the CLI
    pid_file = property(lambda self: self.path("home", "tmp", ".model_server.pid"))

    @staticmethod
    def workdir_of(key_file: str) -> str:
        """The server folder of a key_file.json that a TorchServe wrote."""
        return os.path.dirname(os.path.dirname(os.path.abspath(key_file)))

    @property
    def uid(self) -> int:
        """Whose processes and files the server's are: the owner of its home/, which root set at start (so it
        also tells when start fell back to root), else its user's or the caller's."""
        try:
            return os.lstat(self.home).st_uid
        except FileNotFoundError:
            return ids(self.user)[0]

    def open(self, path: str):
        """Open a file of the server's folder for reading the way root may (privileges.open_below): no links
        followed, no FIFO waited on, only files of root, the caller or the server's user."""
        return open_below(self.workdir, path, (0, os.geteuid(), self.uid))

    # --- configuration --------------------------------------------------------------
    def config(self) -> dict:
        """The properties a start gives TorchServe: the base config with this instance's ports and model
        store, its relative paths made absolute, the overrides, and, with the guard, the management API moved
        to the Unix socket."""
        props = read_properties(self.base_config)
        host = lambda key: props.get(key, "http://127.0.0.1:0").rsplit(":", 1)[0]
        props.update(
            {
                "inference_address": f"{host('inference_address')}:{self.ports.inference}",
                "management_address": f"{host('management_address')}:{self.ports.management}",
                "metrics_address": f"{host('metrics_address')}:{self.ports.metrics}",
                "grpc_inference_port": str(self.ports.grpc_inference),
                "grpc_management_port": str(self.ports.grpc_management),
                OIP_GRPC_KEY: str(self.ports.oip_grpc),
                "model_store": self.model_store,
            }
        )
        # Paths in config.properties are relative to its folder (the repository root); the server runs
        # elsewhere.
        here = os.path.dirname(os.path.abspath(self.base_config))
        if props.get("metrics_config") and not os.path.isabs(props["metrics_config"]):
            props["metrics_config"] = os.path.join(here, props["metrics_config"])
        if "vmargs" in props:
            props["vmargs"] = re.sub(
                r"(-Dlog4j\.configurationFile=)(?!/)(\S+)",
                lambda m: m[1] + os.path.join(here, m[2]),
                props["vmargs"],
            )
        props.update(self.overrides)
        if self.guard:  # TorchServe's own management API moves to a socket only its user can reach
            props[GUARD_KEY] = props["management_address"]
            props.update({"management_address": f"unix:{self.management_socket}", "use_native_io": "true"})
        return props

    def running_config(self) -> dict | None:
        """The properties the running TorchServe was started with (the -f file on its command line: for
        start(), the generated config), or None when it is not running."""
        pid = self.pid()
        if pid is None:
            return None
        try:
            proc = psutil.Process(pid)
            cmd, cwd = proc.cmdline(), proc.cwd()
        except psutil.Error:
            return None
        args = cmd[cmd.index(FRONTEND) + 1 :] if FRONTEND in cmd else []
        props = self.config()  # started without -f, or with a file outside its folder: our best guess
        if "-f" in args[:-1]:
            try:
                with self.open(os.path.join(cwd, args[args.index("-f") + 1])) as f:
                    props = parse_properties(io.TextIOWrapper(f, encoding="latin-1"))
            except OSError:
                pass
        if "--disable-token-auth" in args:
            props["disable_token_authorization"] = "true"
        return props

    def write_config(self, restore: bool = True) -> tuple[str, dict | None]:
        """The generated config, and the restore plan (deploy/snapshot.py; None with restore=False)."""
        props = self.config()
        plan = (
            restore_plan(self.log_dir, self.model_store, self.path("state"), self.open) if restore else None
        )
        if plan and plan["snapshot"]:
            props["model_snapshot"] = json.dumps(plan["snapshot"])
        self.prepare_run_dir()
        text = format_properties(props, f"generated by deploy/server.py from {self.base_config}; do not edit")
        # root's file in root's folder; the server's user reads it through the group
        mode, group = (0o640, ids(self.user)[1]) if self.user else (0o600, -1)
        write_new(self.generated_config, text.encode("latin-1"), mode, group)
        return self.generated_config, plan

    # --- process control ---------------------------------------------------------------
    def pid(self) -> int | None:
        """TorchServe's frontend: the pid in its pid file (its user's to write), if that is a TorchServe
        frontend running as that user."""
        proc = process.find_by_pid_file(self.pid_file, FRONTEND, self.uid, opener=self.open)
        return proc.pid if proc else None

    def processes(self) -> list[psutil.Process]:
        """The frontend and its workers: what stop() may signal (only processes of the server's user)."""
        pid = self.pid()
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)] if pid else []
            return [p for p in procs if p.uids().real == self.uid]
        except psutil.Error:
            return []

    def is_running(self) -> bool:
        """Whether this instance's TorchServe frontend runs (pid())."""
        return self.pid() is not None

    def start(self, models: str | None = DEFAULT_MODELS, restore: bool = True, timeout: float = 180) -> dict:
        """Start and wait until every registered version has a READY worker. When TorchServe runs but its
        guard does not, relaunch the guard alone (`relaunched` in the answer). `exposed` says why the ports
        that can register a model are reachable by every local user, or is None when the firewall keeps them
        to root and the server's user."""
        if self.is_running():
            if self.guard and guard.state(self) in ("down", "frozen", "unsupervised"):
                guard.stop(self)
                self.launch_guard()
                self.wait_ready(timeout)
                return {"restored": False, "relaunched": ["guard"], "exposed": self.exposure(), "models": {}}
            raise ServerError(f"TorchServe is already running (pid {self.pid()}); stop it first")
        self.check_ports_free()
        self.forget()
        missing = self.unreachable() if self.user else []
        if missing:
            log.warning(
                f"warning: running TorchServe as root: user {self.user!r} cannot reach {', '.join(missing)}. "
                "Give it read access to the folders above the repository (docs/security.md)."
            )
            self.user = None
        self.prepare_dirs()
        config, plan = self.write_config(restore)
        snapshot = plan and plan["snapshot"]
        exposed = self.fence()  # before TorchServe listens
        cmd = self.start_command(config, None if snapshot else models)
        try:
            # TorchServe's JVM inherits stdout: never give it ours, or callers waiting on the pipe hang. Its
            # log is opened by the child, as the server's user.
            subprocess.run(
                logged(cmd, os.path.join(self.log_dir, "torchserve.out")),
                cwd=self.home,
                env=self.env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                check=True,
                timeout=60,
                **self.as_user(),
            )
            if self.guard:
                self.launch_guard()
            if self.oip_grpc:
                oip_grpc_launch.launch(self)
            self.wait_ready(timeout)
        except BaseException:  # not ready, Ctrl-C...: leave nothing running (a later start would refuse)
            self.stop()
            raise
        # "plan": what should be served; deploy.versions.check_restore compares it with what is
        return {
            "restored": bool(snapshot),
            "exposed": exposed,
            "models": management.models(self),
            "plan": plan,
        }

    def start_command(self, config: str, models: str | None) -> list[str]:
        """`torchserve --start` with the generated config, loading those of `models` that are in the store."""
        cmd = [os.path.join(os.path.dirname(sys.executable), "torchserve"), "--start", "--ts-config", config]
        cmd += ["--model-store", self.model_store]
        in_store = lambda m: os.path.exists(os.path.join(self.model_store, m.split("=")[-1]))  # name=file.mar
        available = [m for m in (models or "").split(",") if m and in_store(m)]
        return cmd + (["--models", *available] if available else [])

    # --- who may connect: TorchServe's TCP ports that can register a model ----------------------------------
    @property
    def fence_name(self) -> str:
        """The name of this server's nftables table (deploy/firewall.py), after its gRPC management port."""
        return firewall.table_name(self.ports.grpc_management)

    def registering_ports(self) -> list[int]:
        """gRPC management always; HTTP management when no guard owns the port (TorchServe's own then)."""
        return [self.ports.grpc_management] + ([] if self.guard else [self.ports.management])

    def fence(self) -> str | None:
        """Let only root and the server's user connect to registering_ports(); why not, or None when done."""
        try:
            firewall.restrict(self.fence_name, self.registering_ports(), [0, self.uid])
            return None
        except (firewall.FirewallError, OSError) as e:
            return str(e)

    def exposure(self) -> str | None:
        """Why registering_ports() are open to every local user now, or None when the firewall holds them."""
        if firewall.active(self.fence_name):
            return None
        return "not root" if os.geteuid() != 0 else "no firewall table (nftables missing?)"

    def launch_guard(self):
        """Start the management guard (guard.launch); ServerError when its port cannot be bound."""
        try:
            guard.launch(self)
        except OSError as e:
            raise ServerError(f"{e}; is another process holding port {self.ports.management}?") from None

    # --- KServe v2 gRPC for stock clients: deploy/oip_grpc.py beside TorchServe's own OIP gRPC --------------
    @property
    def oip_grpc(self) -> bool:
        """Whether a start runs deploy/oip_grpc.py: when TorchServe's OIP gRPC is on
        (ts_open_inference_protocol=true)."""
        return str(self.config().get("ts_open_inference_protocol", "")).lower() == "true"

    def check_ports_free(self):
        """ServerError when something already accepts connections on one of the server's ports on
        127.0.0.1 (the OIP gRPC port only when it is used)."""
        for name, port in vars(self.ports).items():
            if name == "oip_grpc" and not self.oip_grpc:
                continue
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise ServerError(
                        f"port {port} ({name}) is already in use: is another TorchServe running?"
                    )

    def wait_ready(self, timeout: float):
        """Until /ping answers 200 and every registered version has its READY workers."""
        process.wait_until(self.ready, timeout, "TorchServe", hint=f"see {self.log_dir}/ts_log.log")

    def ready(self) -> bool | str:
        """wait_ready's probe: True, or what is not ready yet; ServerError when TorchServe has exited."""
        if not self.is_running():
            raise ServerError(
                f"TorchServe exited during start-up; see {self.log_dir}/ts_log.log\n{self.tail_log()}"
            )
        if not os.path.exists(self.key_file) and self.tokens_enabled:
            return "no key file yet"
        try:
            # request() refreshes an expired key: start-up can outlast a short token_expiration_min.
            ping = self.request("GET", "inference", "/ping", timeout=5)
            if ping.status_code != 200:
                return f"ping {ping.status_code} {ping.text.strip()[:80]}"
            return management.all_ready(self) or "ping 200, not every version has its READY workers"
        except (requests.RequestException, ServerError) as e:  # ServerError: a refresh with a stale key file
            return e.__class__.__name__

    def stop(self, timeout: float = 60):
        """Stop TorchServe and wait until the frontend and every worker have exited."""
        self.forget()
        # started as another user than this object says (a fallback to root)
        if self.uid != ids(self.user)[0]:
            self.user = None if self.uid == os.geteuid() else pwd.getpwuid(self.uid).pw_name
        guard.stop(self)
        oip_grpc_launch.stop(self)
        procs = self.processes()
        if procs:
            # As the server's user: its pid file names the process to stop, and the kernel bounds what it can.
            subprocess.run(
                [os.path.join(os.path.dirname(sys.executable), "torchserve"), "--stop"],
                cwd=self.home,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
                **self.as_user(),
            )
            process.reap(procs, timeout)  # stuck: do not leave anything behind
        firewall.lift(self.fence_name)
        return bool(procs)

    def tail_log(self, lines: int = 20) -> str:
        """The last `lines` lines of ts_log.log, read from its last 64 KiB; '' when it cannot be read."""
        try:
            with self.open(os.path.join(self.log_dir, "ts_log.log")) as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 64 * 1024))
                return "".join(f.read().decode(errors="replace").splitlines(keepends=True)[-lines:])
        except OSError:
            return ""
