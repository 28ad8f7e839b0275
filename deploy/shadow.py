"""Shadow through the front door: a share of a model's live predictions also goes to a candidate version,
whose answers are compared with the default's on the same requests and never reach a user.

    scripts/register_version.sh model_store/my_model_v2.0.mar --shadow 10 --step-requests 200

HAProxy 2.6 cannot mirror a request, so a tee of our own does: the door's `canary` backend
(deploy/haproxy_config.py) has a third server, `shadow` (a Unix socket in a folder only the door's owner
writes: deploy/haproxy_config.py's tee_socket), at weight 0 in every config it renders; a shadow run
gives it PERCENT of the model's path (the canary's map and lane: only
bodies the door held whole). The tee parses each request strictly (deploy/guard_request.py's bounded head
reader; one Content-Length, no Transfer-Encoding, a body no larger than the door holds), re-issues a NEW
request (POST, the model's default route, Authorization and Content-Type only) to TorchServe's inference port
and answers the user with the default's status, content type and body (TorchServe unreachable: a 502 JSON).
Off the user's path, a bounded queue and one worker thread send the same body to the candidate's route and
record both top-1 labels (the first key of the JSON answer), both answer times and the candidate's status; a
copy that finds the queue full is dropped and counted.

A tee that is gone refuses connections, and the door retries those on the default (`retry-on conn-failure`);
a restarted door has weight 0 on the tee and an empty map. The run never promotes: the candidate stays
registered, not default; it holds the canary's lease meanwhile (deploy/canary_lease.py). Its report (JSON)
goes to server/state/shadow/. Library code: returns a report or raises CanaryError; deploy/register_version.py
prints."""

import contextlib
import http.client
import json
import os
import queue
import socketserver
import stat
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass

from deploy import canary, canary_lease
from deploy.canary import NAME, check_candidate, route
from deploy.canary_readings import CanaryError, admin
from deploy.errors import error_body
from deploy.frontdoor import FrontDoor
from deploy.guard_request import FIELD_CHARS, Refusal, content_length, only, read_line
from deploy.haproxy_config import CANARY_MAP, CANARY_WEIGHT, drops_privileges
from deploy.privileges import ids, private_files
from deploy.server import TorchServe
from deploy.versions import state_dir

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
    return label if isinstance(p, (int, float)) and not isinstance(p, bool) else None


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


# --- the door, live ----------------------------------------------------------------------------------------


def open_split(door: FrontDoor, model: str, version: str, percent: int):
    """Send `percent` of the model's path to the tee (at door.tee_socket), the rest to the default (candidate
    at 0)."""
    canary.weigh(door, "shadow", 0)
    canary.open_split(door, model, version)  # the route, the candidate at weight 0
    canary.weigh(door, "default", CANARY_WEIGHT - percent)
    canary.weigh(door, "shadow", percent)


def in_place(door: FrontDoor, model: str, percent: int) -> bool:
    """Whether the door still sends `percent` of the model's path to the tee (a restarted one does not)."""
    return canary.split_in_place(door, model, percent, "shadow")


def close_split(door: FrontDoor):
    """Everything back on the default: the tee's weight first, then the canary's close (weights, route)."""
    with contextlib.suppress(OSError, CanaryError):
        canary.weigh(door, "shadow", 0)  # a door that is gone sends nothing to the tee (0 at its start)
    canary.close_split(door)


# --- the run ----------------------------------------------------------------------------------------------


def run(
    ts: TorchServe,
    door: FrontDoor,
    model: str,
    version: str,
    percent: int,
    seconds: float | None = None,
    pairs: int | None = None,
    max_seconds: float = 600,
    say=lambda line: None,
) -> dict:
    """Mirror `percent` of `model`'s live predictions to `version` (registered, not default) until `pairs`
    pairs or `seconds` s (whichever comes first; at most `max_seconds`); the report (also written to
    server/state/shadow/). Users get the default's answers; nothing is promoted."""
    if not 0 < percent < CANARY_WEIGHT:
        raise CanaryError(f"a shadow share is within 1..{CANARY_WEIGHT - 1} %: {percent}")
    if not seconds and not pairs:
        raise CanaryError("a shadow run needs seconds or pairs to wait for")
    default = check_request(ts, door, model, version)
    # the wait, then the tee's stop (its answers in flight, the copies queued, the worker: 3 hops), a margin
    longest = min(seconds or max_seconds, max_seconds) + 3 * (door.server_timeout + 1) + 60
    try:  # as for a canary: the guard refuses others' set-default/unregister of both versions until the end
        canary_lease.hold(ts, model, default, version, longest)
    except canary_lease.Busy as e:
        raise CanaryError(str(e)) from None
    report: dict = {"model": model, "candidate": version, "default": default, "percent": percent}
    report["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0, tee = time.time(), None
    try:
        limit = min(door.buffer, door.max_body)
        tee = Tee(ts.ports.inference, model, version, limit, door.server_timeout, door.tee_socket).start()
        open_split(door, model, version, percent)
        say(f"shadow {model} {version}: {percent} % of {route(model)} mirrored (users get {default})")
        report["ended_by"] = wait(door, model, percent, tee, seconds, pairs, max_seconds)
    finally:
        try:
            close_split(door)  # the lease kept any other split from starting since check_request saw none
            if tee:
                tee.stop()
        finally:
            canary_lease.release(ts)
    report["seconds"] = round(time.time() - t0, 1)
    report.update(summary(tee.pairs, tee.dropped))
    report["candidate_state"] = "registered, not default (a shadow never promotes)"
    report["files"] = write_report(ts, report)
    return report


def check_request(ts: TorchServe, door: FrontDoor, model: str, version: str) -> str:
    """The model's default version, when `version` can be shadowed beside it through `door`; raises why
    not."""
    default = check_candidate(ts, door, model, version, "shadow")
    if admin(door, f"show map {door.path(CANARY_MAP)}").strip():  # its split is not ours to close
        raise CanaryError("a canary or shadow is already splitting at the front door")
    return default


def wait(door: FrontDoor, model: str, percent: int, tee: Tee, seconds, pairs, max_seconds) -> str:
    """Wait for `pairs` pairs or `seconds` s, at most `max_seconds`, or until the door loses the split; why it
    ended."""
    t0 = time.time()
    while True:
        time.sleep(0.5)
        elapsed = time.time() - t0
        if pairs and len(tee.pairs) >= pairs:
            return f"{pairs} pairs"
        if seconds and elapsed >= seconds:
            return f"{seconds} s"
        if elapsed >= max_seconds:
            return f"at most {max_seconds} s (only {len(tee.pairs)} pairs)"
        if not in_place(door, model, percent):
            return "the front door lost the split (restarted?): all traffic is on the default"


def summary(pairs: list[dict], dropped: int) -> dict:
    """pairs, top-1 agreement (over the pairs where both 200 answers are label maps; `unjudged`: the other
    200 answers), candidate errors, dropped copies and the answer-time ratio (candidate p50 / default p50)."""
    answered = [p for p in pairs if p["candidate_status"] == 200]
    statuses = Counter(str(p["candidate_status"]) for p in pairs)
    out: dict = {"pairs": len(pairs), "agreement": None, "candidate_errors": len(pairs) - len(answered)}
    labelled = [p for p in answered if p["default_top1"] is not None and p["candidate_top1"] is not None]
    out["unjudged"] = len(answered) - len(labelled)  # 200 answers that are no label map (KServe's forms)
    out.update(candidate_statuses=dict(statuses), dropped=dropped, default_p50_ms=None, candidate_p50_ms=None)
    out["answer_time_ratio"] = None
    if answered:
        if labelled:
            out["agreement"] = sum(p["candidate_top1"] == p["default_top1"] for p in labelled) / len(labelled)
        out["default_p50_ms"] = statistics.median(p["default_ms"] for p in answered)
        out["candidate_p50_ms"] = statistics.median(p["candidate_ms"] for p in answered)
        out["answer_time_ratio"] = out["candidate_p50_ms"] / out["default_p50_ms"]
    return out


def write_report(ts: TorchServe, report: dict) -> list[str]:
    """server/state/shadow/<model>-<version>-<time>.json (root's state folder, 0700)."""
    folder = os.path.join(state_dir(ts), "shadow")
    path = os.path.join(
        folder, f"{report['model']}-{report['candidate']}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    )
    with private_files():
        os.makedirs(folder, mode=0o700, exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    return [path]
