"""The management port's gatekeeper: it re-issues the management calls it understands, it never forwards bytes.

TorchServe 0.12's register call also loads an unpacked model *directory* from any absolute path, with no
checksum, and no setting turns that off; its handler is code that runs as the server's user. So the
server's own management API listens on a Unix socket inside its private working directory, and this small
proxy owns the management port.

Every request is parsed strictly (one request line, no folded or duplicate headers, no control characters, at
most one Content-Length of 0..MAX_BODY, no Transfer-Encoding) and its key is checked against TorchServe's
key_file.json (which the guard, running as the server's user, can read) before any costly work. Its path is
percent-decoded and split the way TorchServe reads it, its query the way Netty 4.1.53's QueryStringDecoder does
(on '&' *and* ';', '+' as a space); repeated and unknown parameters are refused, each value must have its
parameter's form. Then a *new* request goes to TorchServe, built from the validated values only: method,
normalised path, re-encoded query, the Authorization header. Registrations pass only when `url` is the file name
of a `.mar` in the model store that matches its `.sha256` and is a sound zip with a manifest. Anything else gets
a JSON answer (400, 403, 404, 405, 413; 500 for a bug of ours) and the connection is closed. The log lists each
call as it was re-issued.

    python -m deploy.guard --listen 127.0.0.1:8081 --socket server/tmp/management.sock --model-store model_store
"""

import argparse
import hmac
import http.client
import json
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote_to_bytes, urlencode

import psutil

from bundle import settings
from bundle.settings import GUARD_KEY
from deploy import process
from deploy.archive import NAME, check_archive
from deploy.errors import error_body
from deploy.privileges import logged

ARCHIVE_NAME = re.compile(NAME.pattern + r"\.mar")  # a file name in the store, as archive.sh names them
MAX_BODY = 1 << 20  # the framing we accept; management calls carry parameters, never archives (bodies are refused)
MAX_LINE = 8192  # bytes of the request line or of one header line, CRLF included
MAX_HEADERS = 64
MAX_PARAMS = 16
MAX_NAME = 128  # characters of a path segment or a model name
# TorchServe's answer to a missing or wrong key: the tools (deploy/server.py) recognise it and re-read the key file
INVALID_KEY = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"

TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VISIBLE = bytes(range(0x21, 0x7F))  # what a request target may hold
FIELD_CHARS = VISIBLE + b" \t"  # what a header value may hold: no control characters, no obs-text


class Refusal(Exception):
    """A request the guard answers itself (status, message, TorchServe-style error type)."""

    def __init__(self, status: int, message: str, kind: str = "BadRequest"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def shown(value: str, limit: int = 80) -> str:
    """A client's value inside a message or a log line: quoted, escaped, short."""
    return repr(value[:limit]) + ("…" if len(value) > limit else "")


# --- HTTP framing: the request head ---------------------------------------------------------------------------


@dataclass
class Head:
    method: str
    target: str
    version: str
    headers: dict[str, str]  # lower-case name -> value; every name at most once
    length: int  # the body's, from Content-Length (0 without one)


def only(data: bytes, allowed: bytes) -> bool:
    """Every byte of `data` is one of `allowed` (linear: translate deletes the allowed bytes in one pass)."""
    return not data.translate(None, allowed)


def read_line(rfile) -> bytes | None:
    """One CRLF-terminated line without its CRLF; None at a clean end of input before any byte."""
    line = rfile.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE:
        raise Refusal(400, f"a request line or header line is longer than {MAX_LINE} bytes")
    if not line.endswith(b"\r\n"):
        raise Refusal(400, "every request line and header line ends with CRLF")
    return line[:-2]


def read_head(rfile) -> Head | None:
    """Parse a request head strictly; None when the client closed the connection between requests."""
    line = read_line(rfile)
    if line is None:
        return None
    parts = line.split(b" ")
    if len(parts) != 3 or not 0 < len(parts[0]) <= 16 or not only(parts[0], b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"):
        raise Refusal(400, "the request line is not METHOD SP target SP HTTP/1.x")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise Refusal(400, "only HTTP/1.1 and HTTP/1.0 are spoken here")
    if not target or not only(target, VISIBLE):
        raise Refusal(400, "the request target holds a control character, a space or a non-ASCII byte")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = read_line(rfile)
        if line is None:
            raise Refusal(400, "the request head ended before its blank line")
        if not line:
            return Head(method.decode(), target.decode(), version.decode(), headers, content_length(headers))
        if line[:1] in (b" ", b"\t"):
            raise Refusal(400, "folded header lines (obs-fold) are not accepted")
        name, colon, value = line.partition(b":")
        if not colon or not name or not only(name, TOKEN_CHARS):
            raise Refusal(400, "a header line is not name:value")
        if not only(value, FIELD_CHARS):
            raise Refusal(400, "a header value holds a control character or a non-ASCII byte")
        key = name.decode().lower()
        if key in headers:
            raise Refusal(400, f"header {key} is given twice")
        headers[key] = value.strip(b" \t").decode()
    raise Refusal(400, f"more than {MAX_HEADERS} header lines")


def content_length(headers: dict[str, str]) -> int:
    if "transfer-encoding" in headers:
        raise Refusal(400, "Transfer-Encoding is not accepted here: send a Content-Length")
    value = headers.get("content-length", "0")
    if not value.isascii() or not value.isdigit():
        raise Refusal(400, f"Content-Length {shown(value)} is not a number of bytes")
    if len(value) > 9 or int(value) > MAX_BODY:
        raise Refusal(413, f"management requests are limited to {MAX_BODY} bytes")
    return int(value)


# --- the target, as TorchServe reads it -----------------------------------------------------------------------


def decode(component: str, is_path: bool = False) -> str:
    """Netty's QueryStringDecoder.decodeComponent: %XX sequences are UTF-8 bytes and, outside a path, '+' is a
    space. Netty throws on a broken escape and replaces invalid UTF-8: both are refused here."""
    if "%" not in component and (is_path or "+" not in component):
        return component
    pieces = component.split("%")
    if any(len(p) < 2 or not only(p[:2].encode(), b"0123456789abcdefABCDEF") for p in pieces[1:]):
        raise ValueError(f"broken percent-escape in {shown(component)}")
    if not is_path:
        component = component.replace("+", " ")  # before unquoting: an escaped %2B stays a '+'
    try:
        return unquote_to_bytes(component).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{shown(component)} is not UTF-8") from None


def netty_params(query: str) -> list[tuple[str, str]]:
    """(name, value) pairs in order, as Netty 4.1.53's QueryStringDecoder.decodeParams finds them: a parameter
    ends at '&' or ';', the query at '#'; a leading '=' is skipped, the first later '=' starts the value, and
    parameters with an empty name are dropped. One pass over the query, then one decode per part."""
    pairs, name_start, value_start, i = [], 0, -1, 0

    def add(end: int):
        nonlocal value_start
        if name_start >= end:
            return
        if value_start <= name_start:
            value_start = end + 1
        pairs.append((decode(query[name_start : value_start - 1]), decode(query[value_start:end])))

    for i, c in enumerate(query):
        if c == "=":
            if name_start == i:
                name_start = i + 1
            elif value_start < name_start:
                value_start = i + 1
        elif c in "&;":
            add(i)
            name_start = i + 1
        elif c == "#":
            break
    else:
        i = len(query)
    add(i)
    return pairs


def parse_target(target: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Path segments and parameters of an origin-form target, as TorchServe would see them; Refusal for anything
    that could be read two ways (absolute form, fragments, broken escapes)."""
    if not target.startswith("/"):
        raise Refusal(400, "send the path only (origin-form), not an absolute URL")
    if "#" in target:
        raise Refusal(400, "a request target carries no fragment")
    raw_path, _, query = target.partition("?")
    try:
        # TorchServe decodes the path, then splits it on '/'; the re-issued path has no empty segments
        segments = [s for s in decode(raw_path, is_path=True).split("/") if s]
        pairs = netty_params(query)
    except ValueError as e:
        raise Refusal(400, str(e)) from None
    for s in segments:
        if len(s) > MAX_NAME or not NAME.fullmatch(s):
            raise Refusal(400, f"path segment {shown(s)}: use letters, digits, '.', '_' or '-'")
    return segments, pairs


# --- what may pass -----------------------------------------------------------------------------------------------


def integer(low: int, high: int):
    def check(value: str) -> str:
        if not (value.isascii() and value.isdigit() and len(value) <= 9 and low <= int(value) <= high):
            raise ValueError(f"an integer from {low} to {high}")
        return str(int(value))

    return check


def boolean(value: str) -> str:
    if value.lower() not in ("true", "false"):
        raise ValueError("true or false")
    return value.lower()


def model_name(value: str) -> str:
    if len(value) > MAX_NAME or not NAME.fullmatch(value):
        raise ValueError("letters, digits, '.', '_' or '-'")
    return value


def archive_name(value: str) -> str:
    if not ARCHIVE_NAME.fullmatch(value):
        raise ValueError(
            "the file name of a .mar in the model store: only archives built with scripts/archive.sh (with their "
            ".sha256) can be registered"
        )
    return value


def token_type(value: str) -> str:
    if value not in ("management", "inference"):
        raise ValueError("management or inference")
    return value


WORKERS = integer(0, 32)
PARAMS = {  # every parameter that may reach TorchServe, and the form of its value
    "url": archive_name,
    "model_name": model_name,
    "initial_workers": WORKERS,
    "batch_size": integer(1, 512),
    "max_batch_delay": integer(0, 60_000),  # ms
    "response_timeout": integer(1, 3600),  # s
    "synchronous": boolean,
    "min_worker": WORKERS,
    "max_worker": WORKERS,
    "customized": boolean,
    "limit": integer(0, 100),
    "next_page_token": integer(0, 1_000_000),
    "type": token_type,
}
REGISTRATION: tuple[str, ...] = ("url", "model_name", "initial_workers", "batch_size", "max_batch_delay")
REGISTRATION += ("response_timeout", "synchronous")
SCALE = ("min_worker", "max_worker", "synchronous")
ANY = None  # in a route: any path segment (a model name or version)
ROUTES = {  # (method, path shape) -> the parameters it takes, in the order they are re-issued
    ("GET", ("models",)): ("limit", "next_page_token"),
    ("POST", ("models",)): REGISTRATION,
    ("GET", ("models", ANY)): ("customized",),
    ("GET", ("models", ANY, ANY)): ("customized",),  # a version, or "all"
    ("PUT", ("models", ANY)): SCALE,
    ("PUT", ("models", ANY, ANY)): SCALE,
    ("PUT", ("models", ANY, ANY, "set-default")): (),
    ("DELETE", ("models", ANY)): (),
    ("DELETE", ("models", ANY, ANY)): (),
    ("GET", ("token",)): ("type",),
}


@dataclass
class Call:
    """A management call built from validated values only: what goes to TorchServe."""

    method: str
    path: str
    params: dict[str, str]  # validated, in the order of the route's parameters
    key: str  # which key of key_file.json opens it: "management", or "API" for /token

    @property
    def target(self) -> str:
        return self.path + ("?" + urlencode(self.params) if self.params else "")

    @property
    def registers(self) -> bool:
        return self.method == "POST" and self.path == "/models"


def route(method: str, segments: list[str]) -> tuple[str, ...]:
    """The parameters a call takes; Refusal (403, 404, 405) when the guard does not pass it at all."""
    if segments[:1] == ["workflows"]:
        prefix = "registration refused: " if method == "POST" else ""
        raise Refusal(403, prefix + "workflows are not served by this bundle", "RegistrationRefused")
    fits = lambda shape: len(shape) == len(segments) and all(p in (ANY, s) for p, s in zip(shape, segments))
    methods = [m for m, shape in ROUTES if fits(shape)]
    if not methods:
        raise Refusal(404, f"/{'/'.join(segments)} is not a management call that this guard passes", "NotFound")
    if method not in methods:
        raise Refusal(405, f"{method} is not allowed here (only {', '.join(methods)})", "MethodNotAllowed")
    return next(p for (m, shape), p in ROUTES.items() if m == method and fits(shape))


def build(head: Head) -> Call:
    """The call TorchServe will get for this request, with every parameter's form checked (not yet the archive:
    that is costly, and waits for the key)."""
    segments, pairs = parse_target(head.target)
    registers = head.method == "POST" and segments == ["models"]
    allowed = route(head.method, segments)
    try:
        if head.length:
            raise ValueError("send the parameters in the query string: management calls here carry no body")
        if len(pairs) > MAX_PARAMS:
            raise ValueError(f"more than {MAX_PARAMS} parameters")
        params = {}
        for name, value in pairs:
            if name in params:  # Netty keeps every value and TorchServe reads the first: one meaning only
                raise ValueError(f"parameter {shown(name)} is given twice")
            params[name] = value
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"parameter {shown(unknown[0])} is not accepted here (only {', '.join(allowed)})")
        if registers and "url" not in params:
            raise ValueError("give exactly one url: the file name of an archive in the model store")
        checked = {}
        for name in allowed:
            if name in params:
                try:
                    checked[name] = PARAMS[name](params[name])
                except ValueError as e:
                    raise ValueError(f"{name} {shown(params[name])} is not {e}") from None
    except ValueError as e:
        if registers:
            raise Refusal(403, f"registration refused: {e}", "RegistrationRefused") from None
        raise Refusal(400, str(e)) from None
    path = "/" + "/".join(segments)
    return Call(head.method, path, checked, "API" if segments == ["token"] else "management")


# --- keys ----------------------------------------------------------------------------------------------------------


class Keys:
    """The keys in TorchServe's key_file.json (the guard runs as the server's user and may read it), re-read when a
    presented key does not match (TorchServe rewrites the file when a key is refreshed)."""

    def __init__(self, key_file: str | None, upstream: str):
        self.key_file, self.upstream = key_file, upstream
        self.keys: dict | None = None
        self.tokens: bool | None = None
        self.lock = threading.Lock()

    def authorize(self, call: Call, authorization: str | None) -> dict:
        """The Authorization header to send with `call` ({} with tokens off); Refusal when the key is wrong."""
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
        with self.lock:
            if fresh or self.keys is None:
                self.keys = self.read()
            key = (self.keys.get(kind) or {}).get("key")
        return isinstance(key, str) and hmac.compare_digest(key.encode(), token.encode())

    def read(self) -> dict:
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
                raise Refusal(502, f"TorchServe's management API answered {status} without a key", "BadGateway")
            self.tokens = status == 400
        return self.tokens


# --- the proxy -----------------------------------------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
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
        raise Refusal(502, f"TorchServe's management API did not answer ({e.__class__.__name__})", "BadGateway") from e
    finally:
        conn.close()


class Guard(socketserver.StreamRequestHandler):
    timeout = 30  # a client that stops sending mid-request is dropped, not waited for
    server: "GuardServer"

    def handle(self):
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
            if call.registers:  # the costly part (hash and CRCs of up to a few hundred MB) comes after the key
                try:
                    check_archive(os.path.join(self.server.model_store, call.params["url"]), self.server.model_store)
                except ValueError as e:
                    raise Refusal(403, f"registration refused: {e}", "RegistrationRefused") from None
            status, headers, data = reissue(self.server.upstream, call, auth)
        except (TimeoutError, ConnectionError):  # the client went away or stalled: nothing to answer
            return False
        except Refusal as r:
            return self.refuse(r, head, start)
        except Exception:  # a bug of ours: answer it, never drop the connection without a word
            traceback.print_exc()
            return self.refuse(Refusal(500, "the guard failed on this request", "InternalServerError"), head, start)
        close = head.version == "HTTP/1.0" or "close" in head.headers.get("connection", "").lower()
        passed = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP | {"content-length"}]
        self.reply(status, passed, data, close)
        self.log(f"-> {call.method} {call.target} {status}", start)
        return not close

    def refuse(self, refusal: Refusal, head: Head | None, start: float) -> bool:
        """Answer a refusal as JSON and close the connection (False)."""
        body = error_body(refusal.status, refusal.kind, refusal.message).encode()
        self.reply(refusal.status, [("Content-Type", "application/json")], body, True)
        self.log(f"refused {refusal.status} {head.method if head else '-'}: {refusal.message}", start)
        self.linger()
        return False

    def linger(self):
        """Close gently: closing a socket with unread input resets the connection, and the reset can erase the
        answer before the client reads it (RFC 9112 9.6). So stop sending, then read what the client still sends,
        for 2 s and MAX_BODY bytes at most, before the socket is closed."""
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
        took = (time.perf_counter() - start) * 1000
        print(f"{time.strftime('%d/%b/%Y %H:%M:%S')} {what} {took:.1f} ms", flush=True)


class GuardServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128  # was 5: a burst of tools and probes was refused at the door

    def __init__(self, address, upstream: str, model_store: str, key_file: str | None, fd: int | None = None):
        super().__init__(address, Guard, bind_and_activate=fd is None)
        if fd is not None:  # the listening socket launch() bound, handed down through the supervisor
            self.socket.close()
            self.socket = socket.socket(fileno=fd)
            self.server_address = self.socket.getsockname()
        self.upstream, self.model_store = upstream, os.path.abspath(model_store)
        self.keys = Keys(key_file, upstream)


def bind_port(listen: str) -> socket.socket:
    """The management port, bound and listening in the caller (root, before any child runs). The supervisor
    holds it for the server's whole life and hands it to each guard it starts, so the port is never free: a
    local user who took it while a guard restarted would be sent the management key by the tools (second
    review's own hostile check). A port someone else listens on already is an error, never shared."""
    host, port = listen.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT; a listener still wins the bind
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
    with bind_port(listen) as sock:
        fd = str(sock.fileno())
        supervised = [sys.executable, "-m", "deploy.supervise", "--watch-pid", watch, "--pass-fd", fd, "--"]
        subprocess.Popen(
            logged([*supervised, *guard, "--listen-fd", fd], os.path.join(ts.log_dir, "guard.log")),
            cwd=settings.ROOT,
            env=ts.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outlives this command, like TorchServe
            pass_fds=[sock.fileno()],
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
        process.terminate(procs, timeout, timeout)
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


def key_file_of(pid: int) -> str | None:
    """TorchServe writes key_file.json to its working directory."""
    try:
        return os.path.join(psutil.Process(pid).cwd(), "key_file.json")
    except psutil.Error:
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="host:port of the management port")
    p.add_argument("--socket", required=True, help="TorchServe's management Unix socket")
    p.add_argument("--model-store", required=True)
    p.add_argument("--watch-pid", type=int, default=0, help="exit when this process (TorchServe) is gone")
    p.add_argument("--key-file", help="TorchServe's key_file.json (default: the one in --watch-pid's directory)")
    p.add_argument("--listen-fd", type=int, help="an inherited socket already listening on --listen (launch())")
    args = p.parse_args(argv)
    key_file = args.key_file or (key_file_of(args.watch_pid) if args.watch_pid else None)
    host, port = args.listen.rsplit(":", 1)
    server = GuardServer((host, int(port)), args.socket, args.model_store, key_file, args.listen_fd)
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
