"""The management port's gatekeeper: only checked archives from the model store can be registered.

TorchServe 0.12's register call also loads an unpacked model *directory* from any absolute path, with no
checksum, and no setting turns that off; its handler is code that runs as the server's user. So the
server's own management API listens on a Unix socket inside its private working directory, and this small
proxy owns the management port. It forwards every call unchanged (TorchServe still checks the keys) except
registrations, which pass only when `url` is the file name of a `.mar` in the model store that matches its
`.sha256` and is a sound zip with a manifest; anything else gets 403 with a JSON message.

    python -m deploy.guard --listen 127.0.0.1:8081 --socket server/tmp/management.sock --model-store model_store
"""

import argparse
import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import parse_qs, unquote, urlsplit

import psutil

from deploy import settings
from deploy.archive import NAME, check_archive
from deploy.privileges import logged

GUARD_KEY = "guarded_management_address"  # in a generated config: where the guard listens

ARCHIVE_NAME = re.compile(NAME.pattern + r"\.mar")  # a file name in the store, as archive.sh names them
MAX_BODY = 1 << 20  # management calls carry parameters, never archives
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


def refusal(method: str, target: str, body: bytes, model_store: str) -> str | None:
    """Why this management call may not pass, or None when it may."""
    parts = urlsplit(target)
    # TorchServe decodes the path and ignores empty segments: judge the call by what it will see.
    path = "/" + "/".join(s for s in unquote(parts.path).split("/") if s)
    if method.upper() != "POST" or path not in ("/models", "/workflows"):
        return None
    if path == "/workflows":
        return "workflows are not served by this bundle"
    if body.strip():  # TorchServe also reads the url from a JSON body: one place to check, the query string
        return "send registration parameters in the query string, not in the body"
    urls = parse_qs(parts.query).get("url", [])
    if len(urls) != 1:
        return "give exactly one url: the file name of an archive in the model store"
    if not ARCHIVE_NAME.fullmatch(urls[0]):
        return (
            f"url {urls[0]!r} is not the file name of a .mar in the model store: only archives built with "
            "scripts/archive.sh (with their .sha256) can be registered"
        )
    try:
        check_archive(os.path.join(model_store, urls[0]), model_store)
    except ValueError as e:
        return str(e)
    return None


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class Guard(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like TorchServe
    timeout = 30  # a client that stops sending mid-request is dropped, not waited for
    server_version = "torchserve-bundle-guard"

    def do_any(self):
        start = time.perf_counter()
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self.answer(411, "send a Content-Length")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self.answer(413, f"management requests are limited to {MAX_BODY} bytes")
        body = self.rfile.read(length) if length else b""
        reason = refusal(self.command, self.path, body, self.server.model_store)
        if reason:
            return self.answer(403, f"registration refused: {reason}", "RegistrationRefused")
        upstream = UnixHTTPConnection(self.server.upstream, timeout=600)  # synchronous registration waits
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
        except OSError as e:
            return self.answer(502, f"TorchServe's management API did not answer ({e.__class__.__name__})")
        finally:
            upstream.close()
        self.send_response(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() not in HOP_BY_HOP | {"content-length"}:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.log(resp.status, start)

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = do_HEAD = do_any  # noqa: N815

    def answer(self, status: int, message: str, kind: str = "BadRequest"):
        data = json.dumps({"code": status, "type": kind, "message": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.log(status, None)

    def log(self, status: int, start: float | None):
        took = f" {(time.perf_counter() - start) * 1000:.1f} ms" if start else ""
        print(f"{self.log_date_time_string()} {self.command} {self.path.split('?')[0]} {status}{took}", flush=True)

    def log_message(self, *args):  # the access log above carries no query strings (they can hold model urls)
        pass


def launch(ts):
    """Start the guard for `ts`, detached, as the server's user, under deploy/supervise.py, which restarts it
    when it dies while TorchServe runs. Both write to logs/guard.log, which the child opens as that user."""
    listen = ts.config()[GUARD_KEY].split("://", 1)[-1]
    watch = str(ts.pid() or 0)
    guard = [sys.executable, "-m", "deploy.guard", "--listen", listen, "--socket", ts.management_socket]
    guard += ["--model-store", ts.model_store, "--watch-pid", watch]
    supervised = [sys.executable, "-m", "deploy.supervise", "--watch-pid", watch, "--", *guard]
    subprocess.Popen(
        logged(supervised, os.path.join(ts.log_dir, "guard.log")),
        cwd=settings.ROOT,
        env=ts.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives this command, like TorchServe
        **ts.as_user(),
    )


def processes(ts) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(supervisors, guards) of `ts`: processes of the server's user whose command line runs that module for this
    server's management socket. Found by what they are, not through a pid file: a pid file can name anyone's
    process, and root signals only these."""
    supervisors, guards = [], []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        cmd, uids = proc.info["cmdline"] or [], proc.info["uids"]
        if uids is None or uids.real != ts.uid or ts.management_socket not in cmd:
            continue
        if cmd[1:3] == ["-m", "deploy.supervise"]:
            supervisors.append(proc)
        elif cmd[1:3] == ["-m", "deploy.guard"]:
            guards.append(proc)
    return supervisors, guards


def state(ts) -> str:
    """'running', 'unsupervised' (running, but nothing restarts it), 'restarting' (its supervisor runs),
    'frozen' (stopped by a signal) or 'down'."""
    supervisors, guards = processes(ts)
    try:
        frozen = any(g.status() == psutil.STATUS_STOPPED for g in guards)
    except psutil.Error:
        frozen = False
    if frozen:
        return "frozen"
    if guards:
        return "running" if supervisors else "unsupervised"
    return "restarting" if supervisors else "down"


def stop(ts, timeout: float = 5) -> bool:
    """Stop the guard of `ts` and its supervisor: SIGTERM, then SIGKILL for whatever is still there after
    `timeout` seconds (a frozen guard still holds the port). False when none ran."""
    supervisors, guards = processes(ts)
    procs = supervisors + guards  # the supervisor first, so that it does not restart the guard
    for _ in range(3):  # a supervisor that restarted its guard just before it heard SIGTERM: once more
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=timeout)
        left = processes(ts)
        if not left[0] + left[1]:
            break
        procs = left[0] + left[1]
    return bool(supervisors or guards)


def follow(pid: int, server):
    while psutil.pid_exists(pid):
        time.sleep(1)
    print(f"TorchServe (pid {pid}) is gone: stopping", flush=True)
    server.shutdown()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="host:port of the management port")
    p.add_argument("--socket", required=True, help="TorchServe's management Unix socket")
    p.add_argument("--model-store", required=True)
    p.add_argument("--watch-pid", type=int, default=0, help="exit when this process (TorchServe) is gone")
    args = p.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    server = http.server.ThreadingHTTPServer((host, int(port)), Guard)
    server.daemon_threads = True
    server.upstream, server.model_store = args.socket, os.path.abspath(args.model_store)
    print(f"guarding {args.listen} -> unix:{args.socket} (model store {server.model_store})", flush=True)
    if args.watch_pid:  # however TorchServe ended (stop, crash, kill), its guard does not outlive it
        threading.Thread(target=follow, args=(args.watch_pid, server), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
