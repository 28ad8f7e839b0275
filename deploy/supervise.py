"""Keep a command running while the process it serves lives: restart it when it dies.

    python -m deploy.supervise --watch-pid PID -- COMMAND...

The management guard runs under it (deploy/guard.py launch()): a guard that crashed or was killed is back
within a second, instead of leaving the management port dead while inference goes on. A command that exits
with status 0 is done (the guard does when TorchServe is gone) and is not restarted; SIGTERM stops the command
and the supervisor. `--pass-fd` keeps a descriptor (the guard's listening socket) open across restarts, so the
port is never free between a death and the restart.
"""

import argparse
import signal
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
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command after --")
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


if __name__ == "__main__":
    sys.exit(main())
