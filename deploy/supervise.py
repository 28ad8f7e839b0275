"""Keep a command running while the process it serves lives: restart it when it dies.

    python -m deploy.supervise --watch-pid PID -- COMMAND...

The management guard runs under it (deploy/guard.py launch()): a guard that crashed or was killed is back
within a second, instead of leaving the management port dead while inference goes on. A command that exits
with status 0 is done (the guard does when TorchServe is gone) and is not restarted; SIGTERM stops the command
and the supervisor. `--pass-fd` keeps a descriptor (the guard's listening socket) open across restarts, so the
port is never free between a death and the restart. `--hold-port` does the same for a command that binds its
own port (gRPC's server cannot take a socket): the supervisor binds the port first with SO_REUSEPORT and never
listens on it; Linux then lets only sockets of the same user bind that port (SO_REUSEPORT shares a port only
between one user's sockets), so no other local user can take it, at start or between a death and the restart.
The command binds beside the holder (SO_REUSEPORT too) and alone receives the connections (the holder does not
listen).
"""

import argparse
import signal
import socket
import subprocess
import sys
import time

import psutil


def main(argv=None) -> int:
    """Run the command after `--` and restart it when it dies, until it exits 0, the watched process is gone
    or a signal stops it; returns 0."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--watch-pid", type=int, required=True, help="stop supervising when this process is gone")
    p.add_argument("--delay", type=float, default=1.0, help="seconds between a death and the restart")
    p.add_argument("--pass-fd", type=int, action="append", default=[], help="a descriptor each run inherits")
    p.add_argument("--hold-port", help="HOST:PORT to hold for the command (SO_REUSEPORT, never listening)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command after --")
    if args.watch_pid <= 0:  # psutil says pid 0 exists: the command would be supervised for ever
        p.error("--watch-pid must be a process id (> 0)")
    try:
        holder = hold(args.hold_port) if args.hold_port else None  # noqa: F841 (held until we exit)
    except OSError as e:
        print(f"supervise: cannot hold {args.hold_port} ({e.strerror}): another process has it", flush=True)
        return 1
    stopping, child = False, None

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    while not stopping and psutil.pid_exists(args.watch_pid):
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=args.pass_fd)
        code = child.wait()
        if stopping or code == 0:
            break
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{when} supervise: {' '.join(cmd[:3])} exited with {code}; restarting in {args.delay:g} s",
            flush=True,
        )
        time.sleep(args.delay)  # a command that dies at once is not restarted in a tight loop
    return 0


def hold(address: str) -> socket.socket:
    """A TCP socket bound to `address` (host:port) with SO_REUSEPORT, not listening: while it lives, only
    sockets of this user can bind the port. OSError when it is taken."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # never SO_REUSEADDR: that would share it
        s.bind((host, int(port)))
    except OSError:
        s.close()
        raise
    return s


if __name__ == "__main__":
    sys.exit(main())
