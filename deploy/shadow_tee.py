"""The shadow run's tee (deploy/shadow.py): an HTTP server on a Unix socket that the front door's `canary`
backend sends the shadow's share to. It parses each request strictly (deploy/guard_request.py's bounded line
reader; one Content-Length, no Transfer-Encoding, a body no larger than the door holds), re-issues a NEW
request (POST, the model's default route, Authorization and Content-Type only) to TorchServe's inference port
and answers the user with the default's status, content type and body (TorchServe unreachable: a 502 JSON).
Off the user's path, a bounded queue and one worker thread send the same body to the candidate's route and
record both top-1 labels, both answer times and the candidate's status; a copy that finds the queue full is
dropped and counted."""

import contextlib
import http.client
import json
import os
import queue
import socketserver
import stat
import threading
import time
from dataclasses import dataclass

from deploy.canary import NAME, route
from deploy.canary_readings import CanaryError
from deploy.client import is_probability
from deploy.errors import error_body
from deploy.guard_request import FIELD_CHARS, Refusal, content_length, only, read_line
from deploy.haproxy_config import drops_privileges
from deploy.privileges import ids

MAX_ANSWER = 1 << 20  # bytes of TorchServe's answer the tee reads back (a top-5 JSON is ~200)
JSON = {"Content-Type": "application/json"}
IHCL = "inference-header-content-length"  # KServe v2's binary extension: the JSON part's length
QUEUE = 64  # shadow copies waiting for the worker; a copy that finds it full is dropped (and counted)


# --- the tee's reading of a request ----------------------------------------------------------------------


# the headers the tee reads and passes on; every other header the door sent is ignored, never re-issued
USED = ("content-length", "transfer-encoding", "content-type", "authorization", IHCL)
MAX_TEE_HEADERS = 128  # HAProxy passes at most tune.http.maxhdr (101) header lines


@dataclass
class Prediction:
    """A prediction request as the tee parsed it: the only values it passes on."""

    content_type: str | None
    authorization: str | None
    body: bytes
    binary_header: str | None = None  # Inference-Header-Content-Length (v2's binary extension), digits


def read_tee_head(rfile) -> tuple[str, dict[str, str]] | None:
    """(method, the USED headers) of one request head; None when the peer closed before a byte. Strict where
    the tee acts on a header: twice, or a control or non-ASCII byte in one of USED, is a 400. Any other
    header the door passed (a client's X-Forwarded-For beside the door's, a UTF-8 User-Agent) is skipped: it
    is never re-issued, and refusing it would fail a request the door answers. Bounded: MAX_LINE bytes a
    line, MAX_TEE_HEADERS lines."""
    line = read_line(rfile)
    if line is None:
        return None
    method = line.split(b" ", 1)[0]
    if not 0 < len(method) <= 16 or not only(method, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"):
        raise Refusal(400, "the request line is not METHOD SP target SP HTTP/1.x")
    headers: dict[str, str] = {}
    for _ in range(MAX_TEE_HEADERS + 1):
        line = read_line(rfile)
        if line is None:
            raise Refusal(400, "the request head ended before its blank line")
        if not line:
            return method.decode(), headers
        name, colon, value = line.partition(b":")
        key = name.decode("latin-1").lower()
        if not colon or key not in USED:
            continue
        if key in headers:
            raise Refusal(400, f"header {key} is given twice")
        if not only(value, FIELD_CHARS):
            raise Refusal(400, f"header {key} holds a control character or a non-ASCII byte")
        headers[key] = value.strip(b" \t").decode()
    raise Refusal(400, f"more than {MAX_TEE_HEADERS} header lines")


def read_request(rfile, max_body: int) -> Prediction | None:
    """One request from `rfile`, parsed strictly with a cost bound; None when the peer closed before a byte.
    Refusal: two Content-Lengths, Transfer-Encoding (400), a body over `max_body` (413), not POST (405)."""
    head = read_tee_head(rfile)
    if head is None:
        return None
    method, headers = head
    try:
        length = content_length(headers)
    except Refusal as e:
        if e.status == 413:  # over the guard's own limit, which is larger than ours
            raise Refusal(413, f"a mirrored prediction is at most {max_body} bytes", "PayloadTooLarge") from e
        raise
    if length > max_body:  # refused before a byte of the body is read
        raise Refusal(413, f"a mirrored prediction is at most {max_body} bytes", "PayloadTooLarge")
    if method != "POST":
        raise Refusal(405, "only POST predictions are mirrored", "MethodNotAllowed")
    binary = headers.get(IHCL)
    if binary is not None and not is_length(binary):
        raise Refusal(400, f"{IHCL} is not a number of bytes")
    body = rfile.read(length)
    if len(body) != length:
        raise Refusal(400, "the body ended before its Content-Length")
    return Prediction(headers.get("content-type"), headers.get("authorization"), body, binary)


def is_length(text: str) -> bool:
    """Whether a header's value is a byte count: 1 to 9 ASCII digits (no sign, no space)."""
    return text.isascii() and text.isdigit() and len(text) <= 9


def top1(status: int, body: bytes) -> str | None:
    """The top-1 label of a 200 answer that is the handler's label map ({label: probability, ...}, the top-1
    first), else None: a KServe v1 or v2 answer's first key ("predictions", "id") is no label, and two of
    them would agree whatever the versions answered."""
    if status != 200:
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    if not isinstance(answer, dict) or not answer:
        return None
    label, p = next(iter(answer.items()))
    return label if is_probability(p) else None


# --- the tee -----------------------------------------------------------------------------------------------


class Tee:
    """An HTTP server on a Unix socket answering from the model's default and mirroring to `candidate` off
    the user's path. start() it, read `pairs` and `dropped`, stop() it."""

    def __init__(self, backend: int, model: str, candidate: str, max_body: int, timeout: float, path: str):
        if not NAME.fullmatch(model) or not NAME.fullmatch(candidate):
            raise CanaryError(f"{model!r} {candidate!r} cannot go into a route")
        self.path = path
        self.backend, self.max_body, self.timeout = backend, max_body, timeout
        self.default_route, self.candidate_route = route(model), f"{route(model)}/{candidate}"
        self.pairs: list[dict] = []
        self.dropped = 0
        self.counting = threading.Lock()  # handler threads count drops at once
        self.copies: queue.Queue = queue.Queue(QUEUE)
        self.stopping = threading.Event()
        self.server = listen(path)
        self.server.tee = self  # type: ignore[attr-defined]
        self.server.daemon_threads = False  # server_close waits for the answers in flight
        self.threads = [
            threading.Thread(target=self.server.serve_forever, args=(0.2,), daemon=True),
            threading.Thread(target=self.mirror_worker, daemon=True),
        ]

    def start(self) -> "Tee":
        """Listen and mirror; returns self."""
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        """Stop listening, wait (bounded) for the answers in flight and the copies queued, then stop
        mirroring."""
        self.server.shutdown()
        self.server.server_close()
        with contextlib.suppress(FileNotFoundError):  # a door stopped meanwhile removed it
            os.unlink(self.path)  # in a folder only we can write (listen())
        deadline = time.time() + self.timeout + 1
        while not self.copies.empty() and time.time() < deadline:
            time.sleep(0.05)
        self.stopping.set()
        self.threads[1].join(self.timeout + 1)

    def ask(self, path: str, req: Prediction) -> tuple[int, dict[str, str], bytes, float]:
        """(status, the answer's headers to relay, body, ms) of a new request with `req`'s values to
        TorchServe's `path`; OSError or http.client.HTTPException when TorchServe does not answer, ValueError
        for an answer too large."""
        headers = {"Content-Length": str(len(req.body))}
        if req.content_type is not None:
            headers["Content-Type"] = req.content_type
        if req.authorization is not None:
            headers["Authorization"] = req.authorization
        if req.binary_header is not None:
            headers["Inference-Header-Content-Length"] = req.binary_header
        conn = http.client.HTTPConnection("127.0.0.1", self.backend, timeout=self.timeout)
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body=req.body, headers=headers)
            resp = conn.getresponse()
            body = resp.read(MAX_ANSWER + 1)
        finally:
            conn.close()
        if len(body) > MAX_ANSWER:
            raise ValueError(f"TorchServe's answer is over {MAX_ANSWER} bytes")
        ms = (time.perf_counter() - t0) * 1000
        relayed = {"Content-Type": resp.getheader("Content-Type") or "application/json"}
        binary = resp.getheader(IHCL) or ""
        if is_length(binary):  # a v2 binary answer's JSON length
            relayed["Inference-Header-Content-Length"] = binary
        return resp.status, relayed, body, ms

    def mirror(self, req: Prediction, default_top1: str | None, default_ms: float):
        """Queue a shadow copy for the candidate; dropped (and counted) when the queue is full."""
        try:
            self.copies.put_nowait((req, default_top1, default_ms))
        except queue.Full:
            with self.counting:
                self.dropped += 1

    def mirror_worker(self):
        """Send each queued copy to the candidate and record the pair, until stop()."""
        while not self.stopping.is_set():
            try:
                req, default_top1, default_ms = self.copies.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                status, _, body, ms = self.ask(self.candidate_route, req)
            except (OSError, http.client.HTTPException, ValueError):
                status, body, ms = 0, b"", None  # 0: no answer at all
            self.pairs.append(
                {
                    "default_top1": default_top1,
                    "candidate_top1": top1(status, body),
                    "default_ms": default_ms,
                    "candidate_ms": ms,
                    "candidate_status": status,
                }
            )


def listen(path: str) -> socketserver.ThreadingUnixStreamServer:
    """A server on the Unix socket `path`, whose folder only this user (root, or the door's owner) can
    write, so no other local user can bind the name, now or after a tee killed with -9. HAProxy, when it runs
    as its own user, may connect (group haproxy, 0660) but not list or create there (0711)."""
    folder = os.path.dirname(path)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise CanaryError(f"{folder} is not a folder only this user can write: the tee will not listen there")
    try:
        os.unlink(path)  # the socket of a tee killed before
    except FileNotFoundError:
        pass
    server = socketserver.ThreadingUnixStreamServer(path, TeeHandler)
    if drops_privileges():
        os.chmod(folder, 0o711)
        os.chown(path, -1, ids("haproxy")[1])
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)
    return server


class TeeHandler(socketserver.StreamRequestHandler):
    """One connection from the door: one request, answered from the default, then closed."""

    def handle(self) -> None:
        """Parse, re-issue to the default, answer, queue the copy."""
        tee: Tee = self.server.tee  # type: ignore[attr-defined]
        self.connection.settimeout(tee.timeout)  # a peer that stops sending
        try:
            req = read_request(self.rfile, tee.max_body)
        except Refusal as e:
            return self.reply(e.status, JSON, error_body(e.status, e.kind, e.message).encode())
        except OSError:
            return
        if req is None:
            return
        try:
            status, relayed, body, ms = tee.ask(tee.default_route, req)
        except (OSError, http.client.HTTPException, ValueError) as e:
            message = f"TorchServe did not answer the tee: {e.__class__.__name__}"
            return self.reply(502, JSON, error_body(502, "BadGateway", message).encode())
        self.reply(status, relayed, body)
        if status == 200:  # a pair needs the default's label; its errors are the door's to count
            tee.mirror(req, top1(status, body), ms)

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        """Write one HTTP/1.1 answer and close (each request comes on its own connection)."""
        fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        head = (
            f"HTTP/1.1 {status} {http.client.responses.get(status, 'Status')}\r\n"
            f"{fields}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            self.wfile.write(head.encode("latin-1") + body)
        except OSError:
            pass  # the door gave up on this request; nothing to tell it
