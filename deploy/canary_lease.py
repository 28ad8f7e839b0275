"""The canary's lease: while deploy/canary.py runs, the management guard (deploy/guard.py) refuses
set-default, unregister and scaling of the two versions it splits, unless the call is the rollout's own or
says why it overrides.

The controller (root) writes the lease to run/canary.lease: root's folder, readable by the server's group only
(0750), the file 0640 root:<server's group>, written under a fresh name and renamed (privileges.write_new). It
names the model, the default, the candidate, the controller's pid and start time, an expiry, and a random
token. The controller's management calls carry the token in TOKEN_HEADER; the guard compares it in constant
time and never re-issues the header (it re-issues validated values only). OVERRIDE_HEADER lets anyone holding
the management key act anyway, with a reason that the guard logs. A lease whose controller is gone (its pid
dead, or reused by a process started after the lease) or that is past its expiry blocks nothing: a
controller killed with SIGKILL does not lock its model forever.
"""

import hmac
import json
import os
import re
import secrets
import time

import psutil

from deploy.guard_request import Call, Refusal, shown
from deploy.privileges import ids, write_new

TOKEN_HEADER = "X-Canary-Token"
OVERRIDE_HEADER = "X-Override-Canary"
TOKEN = re.compile(r"[A-Za-z0-9_-]{32,64}")  # secrets.token_urlsafe's alphabet
# a reason for the log: no quotes, no escapes, no control characters
REASON = re.compile(r"[A-Za-z0-9][A-Za-z0-9 .,:;_/()+=@#-]{0,199}")
MAX_LEASE = 4096  # bytes read of a lease file
CLOCK_SLACK = 2.0  # s: a process's start time (from /proc, in clock ticks) against the lease's


# --- the controller's side ----------------------------------------------------------------------------------


class Busy(RuntimeError):
    """Another canary holds a live lease on this server."""


def hold(ts, model: str, default: str, candidate: str, seconds: float) -> dict:
    """Take the lease on `model`'s `default` and `candidate` for at most `seconds`: written to ts.lease_file,
    and `ts`'s management calls carry its token until release(ts). Busy when a live lease is there already."""
    found = stale_or_live(read(ts.lease_file))
    if found and found[0] is None:
        other = found[1]
        raise Busy(f"a canary of {other['model']} {other['candidate']} runs already (pid {other['pid']})")
    now = time.time()
    lease = {"model": model, "default": default, "candidate": candidate, "pid": os.getpid(), "started": now}
    lease.update(started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), expires=now + seconds)
    lease["token"] = secrets.token_urlsafe(32)
    gid = ids(ts.user)[1] if ts.user else -1
    write_new(ts.lease_file, json.dumps(lease).encode(), 0o640 if ts.user else 0o600, gid)
    ts.lease_token = lease["token"]
    return lease


def release(ts):
    """Drop the lease that hold() took: its file removed, `ts`'s calls without its token."""
    ts.lease_token = None
    try:
        os.unlink(ts.lease_file)
    except FileNotFoundError:
        pass


# --- the guard's side ---------------------------------------------------------------------------------------


def read(path: str | None) -> dict | None:
    """The lease at `path` (None when there is none, or it is not a regular file of root's or this user's, or
    not a lease): opened without following a link, MAX_LEASE bytes at most."""
    if not path:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000 and st.st_uid in (0, os.geteuid())):
            return None
        try:
            lease = json.loads(f.read(MAX_LEASE))
        except ValueError:
            return None
    keys = {"model": str, "default": str, "candidate": str, "pid": int, "started": float, "expires": float}
    keys.update(token=str, started_at=str)
    if not isinstance(lease, dict) or any(not isinstance(lease.get(k), t) for k, t in keys.items()):
        return None
    return lease


def stale_or_live(lease: dict | None) -> tuple[str | None, dict] | None:
    """(why the lease is stale, or None when it is live, the lease); None without a lease."""
    if lease is None:
        return None
    if time.time() > lease["expires"]:
        return "it expired", lease
    try:
        born = psutil.Process(lease["pid"]).create_time()
    except psutil.Error:
        return f"its controller (pid {lease['pid']}) is gone", lease
    if born > lease["started"] + CLOCK_SLACK:
        return f"pid {lease['pid']} is another process now", lease
    return None, lease


def header(headers: dict[str, str], name: str, form: re.Pattern) -> str | None:
    """The value of header `name` (read_head keeps one of each), None when absent; Refusal (400) when it has
    not `form`."""
    value = headers.get(name.lower())
    if value is not None and (len(value) > 200 or not form.fullmatch(value)):
        raise Refusal(400, f"header {name} {shown(value)} is not of the form {form.pattern}")
    return value


def guarded(call: Call, lease: dict) -> bool:
    """Whether `call` is a set-default, unregister or scaling of the lease's versions (or of the whole model,
    whose default is one of them): scaling a version to 0 workers mid-canary fails a good candidate, or
    leaves the default's users with 503s."""
    parts = call.path.split("/")[1:]  # models, name[, version[, set-default]]
    if parts[:2] != ["models", lease["model"]] or call.method not in ("PUT", "DELETE"):
        return False
    if len(parts) == 2:  # DELETE of the model, or scaling its default
        return True
    versions = (lease["default"], lease["candidate"])
    return parts[2] in versions and (len(parts) == 3 or parts[3:] == ["set-default"])


def check(call: Call, headers: dict[str, str], path: str | None) -> str | None:
    """What lets `call` pass a running canary's lease at `path`: None when nothing guards it (or it is the
    rollout's own), the override's reason (for the log), a stale lease's note; Refusal (409) otherwise, (400)
    for a malformed token or override header."""
    token = header(headers, TOKEN_HEADER, TOKEN)
    reason = header(headers, OVERRIDE_HEADER, REASON)
    if call.method not in ("PUT", "DELETE"):
        return None
    found = stale_or_live(read(path))
    if found is None or not guarded(call, found[1]):
        return None
    stale, lease = found
    if stale:
        return f"a stale canary lease does not block it ({stale})"
    if token is not None and hmac.compare_digest(token.encode(), lease["token"].encode()):
        return None
    if reason is not None:
        return f"override of the canary of {lease['model']} {lease['candidate']}: {reason}"
    raise Refusal(
        409,
        f"{call.method} {call.path} refused: a canary of {lease['model']} {lease['candidate']} is running "
        f"(started {lease['started_at']}, pid {lease['pid']}) against {lease['default']}; it promotes or "
        f"rolls back by itself. To act anyway, send the header {OVERRIDE_HEADER}: <reason>",
        "Conflict",
    )
