"""The server's folder as root prepares it (deploy/server.py's TorchServe inherits this): run/ root's, home/
the server's user's and made inside by that user only, an earlier layout moved without root walking into it,
and the environment TorchServe runs with. Why root never acts inside home/: deploy/server.py's docstring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Protocol

from bundle import settings
from deploy.errors import ServerError
from deploy.privileges import as_user, ids, logged, open_below, own_dir, unreachable, write_new

LEGACY = ("logs", "tmp", "key_file.json")  # what an earlier version kept at the top of the server's folder


class Server(Protocol):
    """What ServerHome's methods use of the class that inherits them (deploy/server.py's TorchServe)."""

    workdir: str
    model_store: str
    user: str | None

    @property
    def home(self) -> str:
        """TorchServe's working directory, the server's user's."""

    @property
    def run_dir(self) -> str:
        """Root's folder of the generated config."""

    @property
    def log_dir(self) -> str:
        """Where TorchServe writes its logs."""

    @property
    def tmp_dir(self) -> str:
        """TorchServe's TMPDIR."""

    def path(self, *parts: str) -> str:
        """A path inside the server's folder."""

    def as_user(self) -> dict:
        """subprocess arguments that run a child as the server's user."""

    def env(self) -> dict:
        """The environment TorchServe and its helpers run with."""

    def prepare_run_dir(self) -> None:
        """Make the server's folder and its run/ root's."""

    def move_legacy(self) -> None:
        """Move an earlier layout's files into home/."""


class ServerHome:
    """The folder half of TorchServe: preparing run/ and home/, and the environment and user it runs with."""

    def env(self: Server) -> dict:
        """The environment TorchServe and its guard run with: this venv first on PATH, logs and metrics in
        log_dir, TMPDIR in home/tmp (never the shared /tmp), HOME in home/ when it runs as its user, KServe's
        open inference protocol on."""
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["LOG_LOCATION"] = self.log_dir
        env["METRICS_LOCATION"] = self.log_dir
        env.pop("TS_CONFIG_FILE", None)
        env["TS_OPEN_INFERENCE_PROTOCOL"] = (
            "oip"  # KServe v2 health and server metadata over HTTP (docs/kserve.md)
        )
        # Pid file (Python CLI), java.io.tmpdir (worker sockets) and unpacked models: never the shared /tmp,
        # where another user could create /tmp/models first and have their handler loaded.
        env["TMPDIR"] = env["TEMP"] = self.tmp_dir
        if self.user:
            env["HOME"] = self.home  # caches (torch, matplotlib) go here, not to root's home
        return env

    def prepare_run_dir(self: Server):
        """The server's folder and its run/, root's (or the caller's); only those two folders are changed. An
        earlier version gave the whole folder to the server's user: root takes the folder back."""
        me, my_group = os.geteuid(), os.getegid()
        try:
            own_dir(self.workdir, 0o711, me, my_group, adopt=True)
            own_dir(
                self.run_dir, 0o750 if self.user else 0o700, me, ids(self.user)[1] if self.user else my_group
            )
        except PermissionError as e:
            raise ServerError(str(e)) from None

    def prepare_dirs(self: Server):
        """The server's folder, run/ and home/ with its logs/ and tmp/; nothing in home/ readable by others
        (what an earlier version left readable included)."""
        self.prepare_run_dir()
        fresh = not os.path.lexists(self.home)
        if fresh:
            os.mkdir(self.home, 0o700)
            self.move_legacy()
        try:
            own_dir(self.home, 0o700, *ids(self.user), adopt=fresh)
        except PermissionError as e:
            raise ServerError(str(e)) from None
        # Inside home/, only its user acts: a link planted there leads nowhere that user could not go anyway.
        subprocess.run(
            ["/bin/sh", "-c", "mkdir -p logs tmp && { chmod -R go-rwx . 2>/dev/null || true; }"],
            cwd=self.home,
            check=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            **self.as_user(),
        )

    def move_legacy(self: Server):
        """An earlier version kept TorchServe's files at the top of the folder and gave it, and all inside, to
        the server's user. Now that root holds the folder again, those entries move into the new home/
        (renames of entries of root's folder: nothing inside is opened), and the deployment history is copied
        into a state/ of root's (read without following links); the old state/ stays, renamed."""
        uid = ids(self.user)[0]  # home/ is root's until it is handed over
        for name in LEGACY:
            old = self.path(name)
            if os.path.lexists(old) and os.lstat(old).st_uid == uid:
                os.rename(old, os.path.join(self.home, name))
        state = self.path("state")
        if not os.path.lexists(state) or os.lstat(state).st_uid == os.geteuid():
            return
        owner, kept = os.lstat(state).st_uid, f"{state}.from-uid-{os.lstat(state).st_uid}"
        os.rename(state, kept)
        os.mkdir(state, 0o700)
        for entry in os.scandir(kept):
            try:
                with open_below(self.workdir, entry.path, (owner,)) as f:
                    write_new(os.path.join(state, entry.name), f.read(64 << 20))
            except OSError:  # a link, a FIFO, someone else's file: not history
                pass

    def unreachable(self: Server) -> list[str]:
        """What self.user cannot read (or, for the working directory, write) of what the server needs."""
        return unreachable(
            self.user,
            {
                settings.ROOT: os.R_OK | os.X_OK,  # deploy/guard.py
                os.path.dirname(os.path.dirname(os.path.abspath(sys.executable))): os.R_OK
                | os.X_OK,  # the venv
                os.path.dirname(os.path.abspath(json.__file__)): os.R_OK | os.X_OK,  # the standard library
                self.model_store: os.R_OK | os.X_OK,
                os.path.dirname(
                    os.path.abspath(self.workdir)
                ): os.X_OK,  # home/ is its own, under root's folder
                settings.METRICS_CONFIG: os.R_OK,
            },
        )

    def as_user(self: Server) -> dict:
        """subprocess arguments that run a child as the server's user (as the caller when `user` is None),
        without root's groups, under umask 077."""
        return as_user(self.user)

    def detach(self: Server, cmd: list[str], log: str, pass_fds: tuple[int, ...] = ()):
        """Start `cmd` (a helper of this server: the guard's supervisor, the OIP gRPC proxy) from the bundle's
        root as the server's user, in a session of its own, so it outlives this command like TorchServe; its
        output goes to logs/`log`, which the child opens as that user."""
        subprocess.Popen(
            logged(cmd, os.path.join(self.log_dir, log)),
            cwd=settings.ROOT,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=pass_fds,
            **self.as_user(),
        )
