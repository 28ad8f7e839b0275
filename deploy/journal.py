"""The journal of deployment intent and the deployment lock: the one record of which versions of which models
should be served, and which one is default.

Every change (register, gate, unregister, set-default) is appended as `pending` before it is applied and again
as `done` or `failed` after, each line a complete JSON object written with one write() and fsync'd. A process
killed in between leaves a `pending` entry: readers know the change may or may not have happened, and settle
it against what TorchServe serves. A line that cannot be read (a full disk tore it) is skipped and reported,
never fatal. `state` entries are whole baselines (what a start served, or what an operator accepted).

The lock (flock on a file beside the journal) is held across register -> gate -> set-default and around
rollback and unregister, so two operators never interleave; the kernel drops it when its holder dies.
This module knows files only; deploy/versions.py applies the changes to TorchServe."""

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager

from deploy.privileges import private_files

log = logging.getLogger(__name__)  # the CLIs' stderr (Python's last-resort handler)

JOURNAL = "deployments.jsonl"
LOCK = "deploy.lock"


class JournalError(RuntimeError):
    """The journal could not be written, or the deployment lock not taken in time (the message says which)."""


# --- writing ------------------------------------------------------------------------------------------------


def append(state_dir: str, entry: dict) -> dict:
    """Append one complete line and fsync it. On any failure (a full disk) the file is cut back to where it
    was, so no torn line stays behind, and JournalError says nothing was recorded."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, JOURNAL)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}
    line = (json.dumps(entry) + "\n").encode()
    with private_files():
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # an older torn line: never glue ours onto it
            line = b"\n" + line
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError:
                pass
            raise JournalError(
                f"cannot write the deployment journal {path}: {e}; nothing was changed"
            ) from None
    finally:
        os.close(fd)
    return entry


def begin(state_dir: str, op: str, **fields) -> dict:
    """Record an intended change as pending; returns the entry to pass to finish()."""
    return append(state_dir, {"id": uuid.uuid4().hex[:12], "op": op, "state": "pending", **fields})


def finish(state_dir: str, entry: dict, state: str = "done", **fields):
    """Record how a pending change ended ('done' or 'failed'). A failure to write it is reported, not raised:
    the change happened (or not) either way, and readers settle a pending entry against the server."""
    try:
        append(state_dir, {**{k: v for k, v in entry.items() if k != "time"}, "state": state, **fields})
    except JournalError as e:
        log.warning(f"warning: {e}")


def baseline(state_dir: str, models: dict, reason: str):
    """Record a whole state {model: {"versions": {version: archive}, "default": version}}."""
    append(state_dir, {"op": "state", "state": "done", "models": models, "reason": reason})


# --- reading ------------------------------------------------------------------------------------------------


def read(state_dir: str, warn=True) -> list[dict]:
    """The journal's entries, each with its final state (the last readable line of its id), in the order they
    were begun. Unreadable lines are skipped with a warning naming the file and line."""
    path = os.path.join(state_dir, JOURNAL)
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return []
    entries, order = {}, []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            e = json.loads(raw)
            if not isinstance(e, dict) or "op" not in e:
                raise ValueError("not a journal entry")
        except ValueError as err:
            if warn:
                log.warning(f"warning: {path} line {n} is unreadable ({err}); skipped")
            continue
        key = e.get("id") or f"line{n}"
        if key not in entries:
            order.append(key)
        entries[key] = e
    return [entries[k] for k in order]


def replay(entries: list[dict]) -> tuple[dict, list[dict]]:
    """(state, doubts): the state the done entries build, {model: {"versions": {v: archive}, "default": v}},
    and the entries still pending (their change may or may not have been applied), oldest first."""
    models: dict = {}
    doubts: list[dict] = []
    for e in entries:
        if e["op"] == "state":
            models = {
                m: {"versions": dict(s["versions"]), "default": s.get("default")}
                for m, s in e["models"].items()
            }
            doubts = []
            continue
        if e["state"] == "pending":
            doubts.append(e)
            continue
        # a verdict; its changes have their own entries
        if e["state"] != "done" or e["op"] in ("gate", "canary"):
            continue
        model, version = e["model"], e["version"]
        # a later change that went through settles the doubts it supersedes
        doubts = [d for d in doubts if not supersedes(e, d)]
        m = models.setdefault(model, {"versions": {}, "default": None})
        if e["op"] == "register":
            m["versions"][version] = e["archive"]
            m["default"] = e.get("default") or m["default"] or version
        elif e["op"] == "unregister":
            m["versions"].pop(version, None)
            if m["default"] == version:
                m["default"] = None
            if not m["versions"]:
                del models[model]
        elif e["op"] == "default":
            m["default"] = version
    return models, doubts


def supersedes(done: dict, pending: dict) -> bool:
    """Whether the done entry `done` settles the pending entry `pending` of the same model: a set-default
    settles any pending set-default (the newer replaces it) and the gate or canary of the version it promoted
    (that gate is over); a register or unregister settles the same version's pending register, gate or
    unregister."""
    if done["model"] != pending["model"]:
        return False
    if done["op"] == "default":
        return pending["op"] == "default" or (
            pending["op"] in ("gate", "canary") and pending["version"] == done["version"]
        )
    return pending["version"] == done["version"] and pending["op"] in ("register", "gate", "unregister")


def in_doubt(doubts: list[dict], model: str) -> dict[str, str]:
    """{version: op} of a model's versions whose register, gate or canary never finished: withdrawn at the
    next start, never chosen by rollback."""
    return {
        d["version"]: d["op"]
        for d in doubts
        if d["model"] == model and d["op"] in ("register", "gate", "canary")
    }


def pending_default(doubts: list[dict], model: str) -> dict | None:
    """The last set-default of a model that may or may not have been applied."""
    found = [d for d in doubts if d["model"] == model and d["op"] == "default"]
    return found[-1] if found else None


# --- the lock -----------------------------------------------------------------------------------------------

_held = threading.local()  # per thread: each thread is its own operator (tests run two at once)


@contextmanager
def locked(state_dir: str, what: str, timeout: float = 900):
    """Hold the deployment lock (re-entrant within a thread). Waits for another holder, saying who it is."""
    held = getattr(_held, "dirs", None)
    if held is None:
        held = _held.dirs = set()
    key = os.path.realpath(state_dir)
    if key in held:
        yield
        return
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    with private_files():
        fd = os.open(
            os.path.join(state_dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    try:
        deadline, told = time.time() + timeout, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    raise JournalError(
                        f"the deployment lock is still held by {holder(fd)}; try again later"
                    ) from None
                if not told:
                    log.warning(f"waiting for the deployment lock, held by {holder(fd)}")
                    told = True
                time.sleep(0.2)
        try:  # who holds it, for whoever waits (best effort: a full disk must not stop a rollback)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {what}\n".encode(), 0)
        except OSError:
            pass
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
    finally:
        os.close(fd)  # releases the flock


def holder(fd: int) -> str:
    """Who holds the deployment lock, as its holder wrote in the lock file `fd`; else 'another operator'."""
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another operator"
