"""Who the server runs as, who may read what it writes, and how root touches the server's folders without
following the service user's links (see docs/security.md)."""

import errno
import json
import logging
import os
import pwd
import stat
import subprocess
import sys
from contextlib import contextmanager

from bundle import settings

log = logging.getLogger(__name__)  # the CLIs' stderr (Python's last-resort handler)


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
        log.warning(
            f"warning: user {settings.SERVICE_USER!r} does not exist, so TorchServe runs as root; "
            "run scripts/setup.sh as root to create it"
        )
        return None


def ids(user: str | None) -> tuple[int, int]:
    """(uid, gid) of `user`, or of the caller when None."""
    if not user:
        return os.getuid(), os.getgid()
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def as_user(user: str | None) -> dict:
    """subprocess arguments that run a child as `user` (None: the caller), without root's groups, under
    umask 077."""
    if not user:
        return {"umask": 0o077}
    uid, gid = ids(user)
    return {"user": uid, "group": gid, "extra_groups": [], "umask": 0o077}


def own_dir(path: str, mode: int, uid: int, gid: int, adopt: bool = False):
    """`path` is a real folder (never a link) owned by uid:gid with `mode`; created when missing. Only the
    folder itself is changed, through a no-follow handle, never what lies inside. A folder of another owner is
    taken over only when `adopt` (else PermissionError). Its parent must be one that no other user can write
    (the caller's to check)."""
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        created = False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise PermissionError(f"{path} is not a folder (a link?): remove it ({e.strerror})") from None
    try:
        owner = os.fstat(fd).st_uid
        if owner != uid and not (created or adopt):
            raise PermissionError(f"{path} belongs to uid {owner}, not {uid}: remove it (it is recreated)")
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def open_below(base: str, path: str, owners: tuple[int, ...]):
    """Open the regular file `path` inside folder `base` for reading, as root may in a folder another user can
    write: every component below `base` is opened without following links, a FIFO does not block, and the file
    must belong to one of `owners` (a hard link to someone else's file does not). Raises OSError."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base)).split(os.sep)
    if rel[0] in ("..", "."):
        raise OSError(errno.EINVAL, f"{path} is not inside {base}")
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in rel[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        file_fd = os.open(rel[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    st = os.fstat(file_fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid not in owners:
        os.close(file_fd)
        raise OSError(errno.EPERM, f"{path} is not a regular file of uid {'/'.join(map(str, owners))}")
    return os.fdopen(file_fd, "rb")


def write_new(path: str, data: bytes, mode: int = 0o600, gid: int = -1):
    """Replace `path` with a new file holding `data`: written under a fresh name (O_EXCL, no-follow) and
    renamed over it, so a reader never sees half a file and nothing already there is opened. For folders of
    root's own, not ones another user can write."""
    tmp = f"{path}.{os.getpid()}.new"
    if os.path.lexists(tmp):  # left by a killed writer
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)  # the umask does not narrow what was asked for
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def logged(cmd: list[str], log: str) -> list[str]:
    """`cmd` with its stdout and stderr appended to `log`, which the child opens itself: as the user it runs
    as, so a link planted there leads nowhere that user could not write anyway."""
    return ["/bin/sh", "-c", 'log=$1; shift; exec "$@" >>"$log" 2>&1', "sh", log, *cmd]


def shared_dir(path: str):
    """Create folder `path` (and missing parents) readable by root and the service user's group only (0750):
    the model store and training runs hold the models, which other local users must not copy. A folder that
    exists is left as it is."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent)
    os.mkdir(path, 0o750)
    os.chmod(path, 0o750)  # whatever the umask
    if os.geteuid() == 0:
        try:
            os.chown(path, -1, pwd.getpwnam(settings.SERVICE_USER).pw_gid)
        except KeyError:  # no service user: root alone
            pass


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
    return (
        json.loads(out.stdout) if out.returncode == 0 else [f"{sys.executable} ({out.stderr.strip()[-200:]})"]
    )


def tcp_sockets():
    """Each TCP socket /proc/net/tcp{,6} lists: (local port, remote port, state in hex, uid); nothing where
    /proc has no such files."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)  # the header
                for line in f:
                    fields = line.split()  # sl local rem st queues timer retransmits uid ...
                    local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
                    yield local, remote, fields[3], int(fields[7])
        except (OSError, StopIteration):
            pass


def listener_uids(port: int) -> set[int]:
    """The uids of the sockets listening on TCP `port` (any address, IPv4 or IPv6); empty where /proc has no
    socket tables."""
    return {uid for local, _, state, uid in tcp_sockets() if state == "0A" and local == port}


def socket_uid(port: int, peer_port: int) -> int | None:
    """The uid of the local TCP socket on `port` connected to `peer_port` (a client of a server on this
    machine); None when no such socket is listed."""
    for local, remote, state, uid in tcp_sockets():
        if (local, remote) == (port, peer_port) and state != "06":  # not TIME_WAIT (no owner)
            return uid
    return None
