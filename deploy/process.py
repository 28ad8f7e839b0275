"""The processes deploy/ starts and stops (TorchServe, its guard, the front door), supervised one way: a
process is ours only when it runs as the expected user with the expected command line (a pid file can name
anyone's process, and root signals only these); stopping is SIGTERM, a grace period, then SIGKILL; waiting for
something to come up is one loop with a probe, a deadline and a description."""

import os
import time
from collections.abc import Callable, Iterable

import psutil

from deploy.errors import NotReady


def read_pid(path: str, opener: Callable = open) -> int | None:
    """The pid written in a pid file (None when there is none or it holds no number). `opener` opens it the
    way the caller may (root: privileges.open_below, no links followed)."""
    try:
        with opener(path) as f:
            text = f.read(64)
        return int(text.strip())
    except (OSError, ValueError):
        return None


def write_pid(path: str, pid: int):
    """Write `pid` into the file `path` (created or overwritten)."""
    with open(path, "w") as f:
        f.write(str(pid))


def find(
    pid: int | None, marker: str, uid: int | None = None, name: str | None = None
) -> psutil.Process | None:
    """The process `pid` if it runs, its command line holds `marker` and (when given) it runs as `uid` and is
    called `name`; None otherwise."""
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        if not proc.is_running() or marker not in proc.cmdline():
            return None
        if uid is not None and proc.uids().real != uid:
            return None
        if name is not None and proc.name() != name:
            return None
        return proc
    except psutil.Error:
        return None


def find_by_pid_file(path: str, marker: str, uid: int | None = None, name: str | None = None, opener=open):
    """find() of the pid in a pid file."""
    return find(read_pid(path, opener), marker, uid, name)


def terminate(
    procs: Iterable[psutil.Process], timeout: float, kill_timeout: float = 10
) -> list[psutil.Process]:
    """SIGTERM each process, wait up to `timeout` s, SIGKILL whatever is left and wait `kill_timeout` s more;
    returns the processes still alive after all that (normally none)."""
    procs = list(procs)
    signal_each(procs, psutil.Process.terminate)
    return reap(procs, timeout, kill_timeout)


def reap(procs: Iterable[psutil.Process], timeout: float, kill_timeout: float = 10) -> list[psutil.Process]:
    """Wait up to `timeout` s for processes already asked to stop, then SIGKILL the rest: nothing stuck is
    left."""
    _, alive = psutil.wait_procs(list(procs), timeout=timeout)
    signal_each(alive, psutil.Process.kill)
    return psutil.wait_procs(alive, timeout=kill_timeout)[1]


def supervised(uid: int, marker: str, module: str) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(supervisors, helpers): processes of `uid` whose command line holds `marker` and runs
    deploy/supervise.py or `module` (python -m). Found by what they are, not through a pid file: a pid file
    can name anyone's process, and root signals only these."""
    supervisors, helpers = [], []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        cmd, uids = proc.info["cmdline"] or [], proc.info["uids"]
        if uids is None or uids.real != uid or marker not in cmd:
            continue
        if cmd[1:3] == ["-m", "deploy.supervise"]:
            supervisors.append(proc)
        elif cmd[1:3] == ["-m", module]:
            helpers.append(proc)
    return supervisors, helpers


def stop_supervised(
    find: Callable[[], tuple[list[psutil.Process], list[psutil.Process]]], timeout: float
) -> bool:
    """Stop a helper run under deploy/supervise.py: `find` gives (supervisors, helpers); each is sent SIGTERM
    (supervisors first, so that none restarts its helper), then SIGKILL after `timeout` s, up to three rounds
    (a supervisor may have restarted its helper just before it heard SIGTERM). False when none ran."""
    supervisors, helpers = find()
    procs = supervisors + helpers
    for _ in range(3):
        terminate(procs, timeout, timeout)
        left = find()
        if not left[0] + left[1]:
            break
        procs = left[0] + left[1]
    return bool(supervisors or helpers)


def signal_each(procs: Iterable[psutil.Process], send: Callable[[psutil.Process], None]):
    """Call `send` (psutil.Process.terminate or .kill) on each process, skipping those already gone."""
    for proc in procs:
        try:
            send(proc)
        except psutil.NoSuchProcess:
            pass


def remove_pid_file(path: str):
    """Remove the pid file `path` if it is there."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def wait_until(
    probe: Callable[[], bool | str],
    timeout: float,
    what: str,
    interval: float = 0.5,
    hint: str = "",
    error: type[Exception] = NotReady,
):
    """Call `probe` until it returns True; `error` (NotReady) when `timeout` s pass first. A probe that
    returns a string is not ready yet, and the string says why (the last one goes into the error's message); a
    probe that raises ends the wait with its exception (the process it waits for died, say)."""
    deadline, last = time.monotonic() + timeout, "no answer yet"
    while True:
        state = probe()
        if state is True:
            return
        if isinstance(state, str):
            last = state
        if time.monotonic() >= deadline:
            raise error(f"{what} not ready after {timeout:.0f} s ({last})" + (f"; {hint}" if hint else ""))
        time.sleep(interval)
