"""The management port's gatekeeper: it re-issues the management calls it understands, it never forwards
bytes.

TorchServe 0.12's register call also loads an unpacked model *directory* from any absolute path, with no
checksum, and no setting turns that off; its handler is code that runs as the server's user. So the
server's own management API listens on a Unix socket inside its private working directory, and this small
proxy owns the management port.

Every request is parsed strictly (one request line, no folded or duplicate headers, no control characters, at
most one Content-Length of 0..MAX_BODY, no Transfer-Encoding) and its key is checked against TorchServe's
key_file.json (which the guard, running as the server's user, can read) before any costly work. Its path is
percent-decoded and split the way TorchServe reads it, its query the way Netty 4.1.53's QueryStringDecoder
does (on '&' *and* ';', '+' as a space); repeated and unknown parameters are refused, each value must have its
parameter's form. Then a *new* request goes to TorchServe, built from the validated values only: method,
normalised path, re-encoded query, the Authorization header. Registrations pass only when `url` is the file
name of a `.mar` in the model store that matches its `.sha256` and is a sound zip with a manifest. Anything
else gets a JSON answer (400, 403, 404, 405, 409, 413; 500 for a bug of ours) and the connection is closed.
While a canary runs, set-default and unregister of its two versions get 409 unless they are the rollout's own
or carry an override (deploy/canary_lease.py). The log lists each call as it was re-issued.
The reading of a request lives in deploy/guard_request.py; this module holds the keys, the proxy and the
guard's process (launch, state, stop).

    python -m deploy.guard --listen 127.0.0.1:8081 --socket server/tmp/management.sock \\
        --model-store model_store
"""

import argparse
import hmac
import http.client
import json
import os
import socket
import socketserver
import sys
import threading
import time
import traceback
from http import HTTPStatus

import psutil

from bundle.settings import GUARD_KEY
from deploy import canary_lease, process
from deploy.archive import check_archive
from deploy.errors import error_body
from deploy.guard_request import FIELD_CHARS, MAX_BODY, MAX_LINE, Call, Head, Refusal, build, only, read_head
from deploy.privileges import socket_uid

# TorchServe's answer to a missing or wrong key: the tools (deploy/server.py) recognise it and re-read the key
# file
INVALID_KEY = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"


# --- keys ---------------------------------------------------------------------------------------------------


class Keys:
    """The keys in TorchServe's key_file.json (the guard runs as the server's user and may read it), re-read
    when a presented key does not match (TorchServe rewrites the file when a key is refreshed)."""

    def __init__(self, key_file: str | None, upstream: str):
        self.key_file, self.upstream = key_file, upstream
        self.keys: dict | None = None
        self.tokens: bool | None = None
        self.lock = threading.Lock()

    def authorize(self, call: Call, authorization: str | None) -> dict:
        """The Authorization header to send with `call` ({} with tokens off); Refusal when the key is
        wrong."""
        scheme, _, token = (authorization or "").partition(" ")
        if self.key_file is None:  # nothing to check against: TorchServe alone judges the key
            return {"Authorization": f"Bearer {token}"} if scheme == "Bearer" and token else {}
        if scheme == "Bearer" and token:
            for fresh in (False, True):
                if self.matches(call.key, token, fresh):
                    return {"Authorization": f"Bearer {token}"}
        if not self.tokens_on():
            return {}
        raise Refusal(400, INVALID_KEY, "InvalidKeyException")

    def matches(self, kind: str, token: str, fresh: bool) -> bool:
        """Whether `token` is the key file's `kind` key, compared in constant time; the file is re-read first
        when `fresh` (or never read)."""
        with self.lock:
            if fresh or self.keys is None:
                self.keys = self.read()
            key = (self.keys.get(kind) or {}).get("key")
        return isinstance(key, str) and hmac.compare_digest(key.encode(), token.encode())

    def read(self) -> dict:
        """The key file as a dict: {} when it is missing, not an object, or still torn after three reads 50 ms
        apart."""
        assert self.key_file is not None  # authorize() asks only when there is one
        for _ in range(3):  # TorchServe may be rewriting it right now
            try:
                with open(self.key_file) as f:
                    keys = json.load(f)
                return keys if isinstance(keys, dict) else {}
            except FileNotFoundError:
                return {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                time.sleep(0.05)
        return {}

    def tokens_on(self) -> bool:
        """Whether TorchServe checks keys at all (`serve.sh start --no-tokens` turns them off): asked once, of
        TorchServe itself, which answers a call without a key 400 when they are on."""
        if self.tokens is None:
            status, _, _ = reissue(self.upstream, Call("GET", "/models", {"limit": "1"}, "management"), {})
            if status not in (200, 400):
                raise Refusal(
                    502, f"TorchServe's management API answered {status} without a key", "BadGateway"
                )
            self.tokens = status == 400
        return self.tokens


# --- the proxy ----------------------------------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """An http.client connection to a Unix socket (TorchServe's management API) instead of a TCP address."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        """Connect to the socket path, with the connection's timeout."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


def reissue(upstream: str, call: Call, headers: dict) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send `call` to TorchServe's Unix socket as a new request; (status, headers, body) of its answer."""
    conn = UnixHTTPConnection(upstream, timeout=600)  # synchronous registration waits
    try:
        conn.request(call.method, call.target, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    except OSError as e:
        raise Refusal(
            502, f"TorchServe's management API did not answer ({e.__class__.__name__})", "BadGateway"
        ) from e
    finally:
        conn.close()


class Guard(socketserver.StreamRequestHandler):
    """Serves one client connection of the management port: each request read, checked, re-issued to
    TorchServe and answered in turn."""

    timeout = 30  # a client that stops sending mid-request is dropped, not waited for
    server: "GuardServer"

    def handle(self):
        """Answer requests on this connection until one closes it or the client goes away."""
        while self.serve_one():
            pass

    def serve_one(self) -> bool:
        """Answer one request; True when the connection may carry another."""
        start, head = time.perf_counter(), None
        try:
            head = read_head(self.rfile)
            if head is None:
                return False
            call = build(head)
            auth = self.server.keys.authorize(call, head.headers.get("authorization"))
            lease_note = canary_lease.check(call, head.headers, self.server.lease_file)
            if lease_note:  # who (the client's address and local uid), what (below), why
                self.log(f"{self.client()}: {call.method} {call.target}: {lease_note}", start)
            # the costly part (hash and CRCs of up to a few hundred MB) comes after the key
            if call.registers:
                try:
                    check_archive(
                        os.path.join(self.server.model_store, call.params["url"]), self.server.model_store
                    )
                except ValueError as e:
                    raise Refusal(403, f"registration refused: {e}", "RegistrationRefused") from None
            status, headers, data = reissue(self.server.upstream, call, auth)
        except (TimeoutError, ConnectionError):  # the client went away or stalled: nothing to answer
            return False
        except Refusal as r:
            return self.refuse(r, head, start)
        except Exception:  # a bug of ours: answer it, never drop the connection without a word
            traceback.print_exc()
            return self.refuse(
                Refusal(500, "the guard failed on this request", "InternalServerError"), head, start
            )
        close = head.version == "HTTP/1.0" or "close" in head.headers.get("connection", "").lower()
        passed = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP | {"content-length"}]
        self.reply(status, passed, data, close)
        self.log(f"-> {call.method} {call.target} {status}", start)
        return not close

    def client(self) -> str:
        """The client's address, and the uid of the local process holding its socket when /proc tells."""
        host, port = self.client_address[:2]
        uid = socket_uid(port, self.server.server_address[1])
        return f"{host}:{port}" + (f" (uid {uid})" if uid is not None else "")

    def refuse(self, refusal: Refusal, head: Head | None, start: float) -> bool:
        """Answer a refusal as JSON and close the connection (False)."""
        body = error_body(refusal.status, refusal.kind, refusal.message).encode()
        self.reply(refusal.status, [("Content-Type", "application/json")], body, True)
        self.log(f"refused {refusal.status} {head.method if head else '-'}: {refusal.message}", start)
        self.linger()
        return False

    def linger(self):
        """Close gently: closing a socket with unread input resets the connection, and the reset can erase the
        answer before the client reads it (RFC 9112 9.6). So stop sending, then read what the client still
        sends, for 2 s and MAX_BODY bytes at most, before the socket is closed."""
        left, deadline = MAX_BODY + MAX_LINE, time.monotonic() + 2
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while left > 0 and time.monotonic() < deadline:
                self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.rfile.read1(min(left, 65536))
                if not data:
                    return
                left -= len(data)
        except OSError:
            pass

    def reply(self, status: int, headers: list[tuple[str, str]], data: bytes, close: bool):
        """Write one HTTP/1.1 answer: the status, the headers made of visible text only, Content-Length, and
        Connection: close when `close`; a client gone meanwhile is ignored."""
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}", "Server: torchserve-bundle-guard"]
        lines += [f"{k}: {v}" for k, v in headers if only(f"{k}{v}".encode(), FIELD_CHARS)]
        lines += [f"Content-Length: {len(data)}"] + (["Connection: close"] if close else [])
        try:
            self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        except OSError:
            pass

    def log(self, what: str, start: float):
        """Print one line to the guard's log: the time, `what`, and the milliseconds since `start`."""
        took = (time.perf_counter() - start) * 1000
        print(f"{time.strftime('%d/%b/%Y %H:%M:%S')} {what} {took:.1f} ms", flush=True)


class GuardServer(socketserver.ThreadingTCPServer):
    """The management port's server, a thread per connection, on a socket it binds itself or, given `fd`, on
    the one launch() bound."""

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128  # was 5: a burst of tools and probes was refused at the door

    def __init__(
        self,
        address,
        upstream: str,
        model_store: str,
        key_file: str | None,
        fd: int | None = None,
        lease_file: str | None = None,
    ):
        super().__init__(address, Guard, bind_and_activate=fd is None)
        if fd is not None:  # the listening socket launch() bound, handed down through the supervisor
            self.socket.close()
            self.socket = socket.socket(fileno=fd)
            self.server_address = self.socket.getsockname()
        self.upstream, self.model_store = upstream, os.path.abspath(model_store)
        self.keys = Keys(key_file, upstream)
        self.lease_file = lease_file  # a running canary's (deploy/canary_lease.py)


def bind_port(listen: str) -> socket.socket:
    """The management port, bound and listening in the caller (root, before any child runs). The supervisor
    holds it for the server's whole life and hands it to each guard it starts, so the port is never free: a
    local user who took it while a guard restarted would be sent the management key by the tools (second
    review's own hostile check). A port someone else listens on already is an error, never shared."""
    host, port = listen.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # past TIME_WAIT; a listener still wins the bind
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
        sock.listen(GuardServer.request_queue_size)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {listen} for the management guard: {e.strerror}") from None
    return sock


def launch(ts):
    """Start the guard for `ts`, detached, as the server's user, under deploy/supervise.py, which restarts it
    when it dies while TorchServe runs. Both write to logs/guard.log, which the child opens as that user."""
    listen = ts.config()[GUARD_KEY].split("://", 1)[-1]
    watch = str(ts.pid() or 0)
    guard = [sys.executable, "-m", "deploy.guard", "--listen", listen, "--socket", ts.management_socket]
    guard += ["--model-store", ts.model_store, "--watch-pid", watch, "--key-file", ts.key_file]
    guard += ["--lease", ts.lease_file]
    with bind_port(listen) as sock:
        fd = str(sock.fileno())
        supervised = [sys.executable, "-m", "deploy.supervise", "--watch-pid", watch, "--pass-fd", fd, "--"]
        ts.detach([*supervised, *guard, "--listen-fd", fd], "guard.log", pass_fds=(sock.fileno(),))


def processes(ts) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(supervisors, guards) of `ts`: processes of the server's user whose command line runs that module for
    this server's management socket (process.supervised)."""
    return process.supervised(ts.uid, ts.management_socket, "deploy.guard")


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
    return process.stop_supervised(lambda: processes(ts), timeout)


def follow(pid: int, server):
    """Shut `server` down once process `pid` (TorchServe) is gone; polls once a second."""
    while psutil.pid_exists(pid):
        time.sleep(1)
    print(f"TorchServe (pid {pid}) is gone: stopping", flush=True)
    server.shutdown()


def key_file_of(pid: int) -> str | None:
    """TorchServe writes key_file.json to its working directory."""
    try:
        return os.path.join(psutil.Process(pid).cwd(), "key_file.json")
    except psutil.Error:
        return None


def main(argv=None):
    """Run the guard (`python -m deploy.guard`, see the module docstring) until TorchServe is gone or it is
    interrupted; returns 0."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="host:port of the management port")
    p.add_argument("--socket", required=True, help="TorchServe's management Unix socket")
    p.add_argument("--model-store", required=True)
    p.add_argument("--watch-pid", type=int, default=0, help="exit when this process (TorchServe) is gone")
    p.add_argument(
        "--key-file", help="TorchServe's key_file.json (default: the one in --watch-pid's directory)"
    )
    p.add_argument(
        "--listen-fd", type=int, help="an inherited socket already listening on --listen (launch())"
    )
    p.add_argument("--lease", help="a running canary's lease file (deploy/canary_lease.py)")
    args = p.parse_args(argv)
    key_file = args.key_file or (key_file_of(args.watch_pid) if args.watch_pid else None)
    host, port = args.listen.rsplit(":", 1)
    server = GuardServer(
        (host, int(port)), args.socket, args.model_store, key_file, args.listen_fd, args.lease
    )
    print(f"guarding {args.listen} -> unix:{args.socket} (model store {server.model_store})", flush=True)
    if key_file is None:
        print("warning: no key file to check keys against: TorchServe alone checks them", flush=True)
    if args.watch_pid:  # however TorchServe ended (stop, crash, kill), its guard does not outlive it
        threading.Thread(target=follow, args=(args.watch_pid, server), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
