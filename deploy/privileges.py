"""Who the server runs as and who may read what it writes (see docs/security.md)."""

import glob
import json
import os
import pwd
import stat
import subprocess
import sys
from contextlib import contextmanager

from deploy import settings


@contextmanager
def private_files():
    """Files created inside are readable by their owner only."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def service_user() -> str | None:
    """The user TorchServe runs as: settings.SERVICE_USER when started by root (scripts/setup.sh creates it),
    else the caller's own user (None). Root without that user gets a warning and runs as root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(settings.SERVICE_USER)
        return settings.SERVICE_USER
    except KeyError:
        print(
            f"warning: user {settings.SERVICE_USER!r} does not exist, so TorchServe runs as root; "
            "run scripts/setup.sh as root to create it",
            file=sys.stderr,
        )
        return None


def as_user(user: str | None) -> dict:
    """subprocess arguments that run a child as `user` (None: the caller), without root's groups, under
    umask 077."""
    if not user:
        return {"umask": 0o077}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "umask": 0o077}


def make_private(folder: str, subfolders, user: str | None):
    """`folder` and `subfolders` exist with mode 0700; nothing inside is readable by others (what an earlier
    version left readable included); everything belongs to `user` when given."""
    for path in (folder, *subfolders):
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    entry = pwd.getpwnam(user) if user else None
    for path in glob.glob(os.path.join(folder, "**"), recursive=True):
        if not os.path.islink(path):
            os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) & 0o700)
        if entry:
            os.lchown(path, entry.pw_uid, entry.pw_gid)


def unreachable(user: str | None, need: dict[str, int]) -> list[str]:
    """The paths of `need` ({path: os.access mode}) that `user` cannot access; asked of a child running as
    that user, which also proves it can run this Python."""
    code = "import json, os, sys; need = json.loads(sys.argv[1])\n"
    code += "print(json.dumps([p for p, m in need.items() if not os.access(p, m)]))"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(need)],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
            **as_user(user),
        )
    except OSError as e:
        return [f"{sys.executable} ({e})"]
    return json.loads(out.stdout) if out.returncode == 0 else [f"{sys.executable} ({out.stderr.strip()[-200:]})"]
