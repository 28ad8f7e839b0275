"""The management guard (deploy/guard.py) without a TorchServe: the real guard process in front of a stand-in
for TorchServe's management socket that records every byte it receives. What the stand-in receives is what
TorchServe would have: the guard must re-issue requests built from validated values, never forward bytes.
(tests/test_guard.py sends the same kinds of requests through to a real TorchServe.)"""

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
import zipfile

import pytest

from deploy import canary_lease, guard, guard_request
from deploy.archive import write_checksum
from deploy.privileges import ids
from tests.conftest import ROOT, free_port

KEY, API_KEY = "mgmt-key", "api-key"


class Upstream:
    """A stand-in for TorchServe's management API on a Unix socket: records each request head it reads (framed
    by its first Content-Length, like Netty) and answers 200, or 400 to a call without `Authorization` when
    tokens are on."""

    def __init__(self, path: str, tokens: bool = True):
        self.heads, self.tokens = [], tokens
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(64)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.heads.append(head.decode("latin-1"))
                lengths = re.findall(rb"(?im)^content-length:\s*(\d+)", head)
                length = int(lengths[0]) if lengths else 0
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                refused = self.tokens and b"\nauthorization:" not in head.lower()
                status, body = (400, b'{"code": 400}') if refused else (200, b'{"status": "ok"}')
                conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))

    def targets(self) -> list[str]:
        """Request lines received, the guard's one probe of the token mode left out."""
        lines = [h.split("\r\n")[0] for h in self.heads]
        return [line for line in lines if line != "GET /models?limit=1 HTTP/1.1"]


def fake_archive(store, name="my_model.mar"):
    """A sound zip with a manifest and its .sha256: all the guard checks of an archive."""
    path = os.path.join(store, name)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            "MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "my_model", "modelVersion": "1.0"}})
        )
    write_checksum(path)
    return path


def send_raw(port: int, raw: bytes, timeout: float = 10) -> bytes:
    """Raw bytes in, everything the guard answers until it closes (or `timeout` passes) out."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)  # like a client that sent all it had; the guard still answers
        out = b""
        try:
            while data := s.recv(65536):
                out += data
        except (TimeoutError, ConnectionResetError):
            pass
        return out


class GuardProcess:
    """deploy.guard as launch() starts it: --watch-pid names 'TorchServe' (here a sleeper whose working
    directory holds key_file.json, as TorchServe's does)."""

    def __init__(self, tmp, tokens=True):
        self.dir = tmp
        self.store = tmp / "store"
        self.store.mkdir()
        fake_archive(self.store)
        self.key_file = tmp / "key_file.json"
        if tokens:
            self.write_keys(KEY)
        self.upstream = Upstream(str(tmp / "mgmt.sock"), tokens)
        self.sleeper = subprocess.Popen(["sleep", "600"], cwd=tmp)
        self.port = free_port()
        self.log = open(tmp / "guard.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.guard", "--listen", f"127.0.0.1:{self.port}", "--socket"]
            + [
                str(tmp / "mgmt.sock"),
                "--model-store",
                str(self.store),
                "--watch-pid",
                str(self.sleeper.pid),
                "--lease",
                str(tmp / "canary.lease"),
            ],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("the guard did not start")

    def write_keys(self, key):
        keys = {"management": {"key": key}, "inference": {"key": "inf-key"}, "API": {"key": API_KEY}}
        self.key_file.write_text(json.dumps(keys))

    def send(self, raw: bytes, timeout: float = 10) -> bytes:
        return send_raw(self.port, raw, timeout)

    def request(self, method, target, headers=None, body=b"", key=KEY) -> tuple[int, dict]:
        lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close"]
        lines += [f"Authorization: Bearer {key}"] if key else []
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        lines += [f"Content-Length: {len(body)}"] if body else []
        return answer(self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body))

    def log_text(self) -> str:
        self.log.flush()
        return (self.dir / "guard.log").read_text()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.sleeper.kill()
        self.sleeper.wait()
        self.upstream.sock.close()
        self.log.close()


def answer(raw: bytes) -> tuple[int, dict]:
    """Status and JSON body of one HTTP answer (status 0 when there was none)."""
    if not raw:
        return 0, {}
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"raw": body.decode("latin-1")}


@pytest.fixture(scope="module")
def guard_process(tmp_path_factory):
    g = GuardProcess(tmp_path_factory.mktemp("guard"))
    yield g
    g.stop()


@pytest.fixture
def gw(guard_process):
    """The module's guard, its store, keys and stand-in as a test found them at the start."""
    fake_archive(guard_process.store)
    guard_process.write_keys(KEY)
    guard_process.upstream.heads.clear()
    yield guard_process
    assert guard_process.proc.poll() is None  # whatever the test sent, the guard still runs


def refused(status, body):
    return status in (400, 403) and body.get("message")


# --- finding 1: ';' as a query separator, and what else reads a query two ways ------------------------------

TWO_READINGS = {
    "';' before the valid url (finding 1)": "/models?x=1;url=/some/dir&url=my_model.mar",
    "';' after it": "/models?url=my_model.mar;url=/some/dir",
    "two urls": "/models?url=my_model.mar&url=/some/dir",
    "leading '=' (Netty skips it)": "/models?=url=/some/dir&url=my_model.mar",
    "encoded key": "/models?u%72l=/some/dir&url=my_model.mar",
    "encoded ';' in the value": "/models?url=my_model.mar%3Burl=/some/dir",
    "encoded '&' in the value": "/models?url=my_model.mar%26url=/some/dir",
    "fragment": "/models?url=my_model.mar#&url=/some/dir",
    "upper-case key": "/models?URL=/some/dir&url=my_model.mar",
    "'+' in the value": "/models?url=my_model.mar+x",
    "handler (unchecked before)": "/models?url=my_model.mar&handler=/some/dir/handler.py",
    "runtime": "/models?url=my_model.mar&runtime=python3",
    "JSON-ish model name": "/models?url=my_model.mar&model_name=../x",
    "workers not a number": "/models?url=my_model.mar&initial_workers=1e9",
    "workers out of range": "/models?url=my_model.mar&initial_workers=100000",
    "negative batch": "/models?url=my_model.mar&batch_size=-1",
    "synchronous not a boolean": "/models?url=my_model.mar&synchronous=yes",
    "broken escape": "/models?url=my_model.mar%G1",
    "not UTF-8": "/models?url=my_model.mar&model_name=%FF",
    "absolute form": "http://127.0.0.1/models?url=/some/dir",
    "dot segment": "/models/../models?url=/some/dir",
    "encoded slash": "/models%2F..%2Fmodels?url=/some/dir",
    "workflows": "/workflows?url=x.war",
}


@pytest.mark.parametrize("target", TWO_READINGS.values(), ids=TWO_READINGS.keys())
def test_a_query_that_could_be_read_two_ways_never_reaches_torchserve(gw, target):
    status, body = gw.request("POST", target)
    assert refused(status, body), (status, body)
    # ';' case before: 'POST /models?x=1;url=/some/dir&url=my_model.mar' passed
    assert gw.upstream.targets() == []


def test_a_registration_is_reissued_from_validated_values_only(gw):
    junk = {
        "X-Forwarded-For": "1.2.3.4",
        "Cookie": "a=b",
        "Content-Type": "application/json",
        "X-Url": "/some/dir",
    }
    status, _ = gw.request("POST", "//%6Dodels/?url=my%5Fmodel.mar&synchronous=TRUE&initial_workers=01", junk)
    assert status == 200
    (head,) = gw.upstream.heads
    lines = head.split("\r\n")
    assert lines[0] == "POST /models?url=my_model.mar&initial_workers=1&synchronous=true HTTP/1.1"
    names = sorted(line.split(":")[0].lower() for line in lines[1:])
    assert names == ["accept-encoding", "authorization", "content-length", "host"], head  # was: every header
    assert f"Authorization: Bearer {KEY}" in lines and "Content-Length: 0" in lines
    # the guard's log lists what it re-issued (it logged no query before)
    assert "-> POST /models?url=my_model.mar&initial_workers=1&synchronous=true 200" in gw.log_text()


def test_other_management_calls_are_reissued_from_a_parsed_form(gw):
    calls = [
        ("GET", "/models?limit=5", "GET /models?limit=5"),
        ("GET", "/models/my_model/all", "GET /models/my_model/all"),
        ("GET", "/models/my%5Fmodel/1.0?customized=true", "GET /models/my_model/1.0?customized=true"),
        (
            "PUT",
            "/models/my_model/1.0?min_worker=2;max_worker=2",
            "PUT /models/my_model/1.0?min_worker=2&max_worker=2",
        ),
        ("PUT", "/models/my_model/2.0/set-default", "PUT /models/my_model/2.0/set-default"),
        ("DELETE", "/models/my_model/2.0", "DELETE /models/my_model/2.0"),
    ]
    for method, target, sent in calls:
        assert gw.request(method, target)[0] == 200, target
        assert gw.upstream.targets()[-1] == sent + " HTTP/1.1"
    assert gw.request("GET", "/token?type=management", key=API_KEY)[0] == 200
    for method, target in [
        ("GET", "/models?limit=1&limit=2"),  # repeated
        ("GET", "/models?x=1"),  # unknown
        ("DELETE", "/models/..%2F..%2Fetc"),  # a decoded '..' segment
        ("DELETE", "/models/my_model/1.0?url=/some/dir"),
        ("PATCH", "/models/my_model"),
        ("GET", "/api-description"),
        ("GET", "/token?type=management;type=API"),
    ]:
        status, body = gw.request(method, target, key=API_KEY if "token" in target else KEY)
        assert status in (400, 403, 404, 405) and body["message"], (target, status, body)
    assert len(gw.upstream.targets()) == len(calls) + 1


# --- framing: findings 2 and 10, and the guard that died on a bad header ------------------------------------

SMUGGLED = b"POST /models?url=/some/dir HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
FRAMINGS = {
    "two Content-Lengths (finding 2)": b"Content-Length: %d\r\nContent-Length: 0\r\n" % len(SMUGGLED),
    "Content-Length and Transfer-Encoding": b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n"
    % len(SMUGGLED),
    "chunked": b"Transfer-Encoding: chunked\r\n",
    "Content-Length with a sign": b"Content-Length: +%d\r\n" % len(SMUGGLED),
    "Content-Length list": b"Content-Length: %d, %d\r\n" % (len(SMUGGLED), len(SMUGGLED)),
    "folded header": b"Content-Length: %d\r\nX-A: b\r\n c\r\n" % len(SMUGGLED),
    "space before colon": b"Content-Length : %d\r\n" % len(SMUGGLED),
}


@pytest.mark.parametrize("framing", FRAMINGS.values(), ids=FRAMINGS.keys())
def test_an_ambiguous_framing_is_refused_and_nothing_is_smuggled(gw, framing):
    raw = b"POST /models/my_model?min_worker=1 HTTP/1.1\r\nHost: x\r\n" + AUTH + framing + b"\r\n" + SMUGGLED
    status, body = answer(gw.send(raw))
    assert status == 400 and body["type"] == "BadRequest", (status, body)
    assert gw.upstream.targets() == []  # two CLs before: 'POST /models?url=/some/dir' reached TorchServe


BAD_HEADS = {
    "negative Content-Length (finding 10)": b"GET /models HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    "Content-Length abc": b"GET /models HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    "huge Content-Length": b"GET /models HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
    "control character in a header": b"GET /models HTTP/1.1\r\nX-A: a\x01b\r\n\r\n",
    "NUL in the target": b"GET /models\x00 HTTP/1.1\r\n\r\n",
    "bare LF": b"GET /models HTTP/1.1\nHost: x\n\n",
    "CR inside a line": b"GET /models HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
    "two spaces": b"GET  /models HTTP/1.1\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "no version": b"GET /models\r\n\r\n",
    "non-ASCII header": b"GET /models HTTP/1.1\r\nX-A: \xc3\xa9\r\n\r\n",
    "line too long": b"GET /models HTTP/1.1\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
    "too many headers": b"GET /models HTTP/1.1\r\n"
    + b"".join(b"X-%d: a\r\n" % i for i in range(70))
    + b"\r\n",
}


@pytest.mark.parametrize("raw", BAD_HEADS.values(), ids=BAD_HEADS.keys())
def test_a_malformed_request_gets_a_json_answer(gw, raw):
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(raw)  # and keep the connection open: -1 made the guard read until the client closed (1 GB)
        head = s.recv(65536)
    status, body = answer(head)
    assert status in (400, 413) and body["message"], (status, head)  # 'Content-Length: abc': no answer at all
    assert gw.upstream.targets() == []


# --- the key, before any costly work ------------------------------------------------------------------------


def test_the_key_is_checked_before_the_archive(gw):
    with open(os.path.join(gw.store, "my_model.mar"), "ab") as f:
        f.write(b"\0")  # hashing it would find a mismatch: the answer tells which check ran first
    for key in (None, "wrong", API_KEY, "inf-key"):
        status, body = gw.request("POST", "/models?url=my_model.mar", key=key)
        # was 403 'SHA-256 ... does not match'
        assert (status, body["type"]) == (400, "InvalidKeyException"), body
        assert body["message"] == guard.INVALID_KEY
    status, body = gw.request("POST", "/models?url=my_model.mar")
    assert status == 403 and "does not match" in body["message"]
    assert gw.request("GET", "/token?type=inference", key=KEY)[0] == 400  # /token takes the API key only
    assert gw.upstream.targets() == []


def test_a_refreshed_key_is_read_again(gw):
    assert gw.request("GET", "/models")[0] == 200
    gw.write_keys("refreshed")  # what GET /token?type=management does to key_file.json
    assert gw.request("GET", "/models", key="refreshed")[0] == 200
    assert gw.request("GET", "/models", key=KEY)[0] == 400  # read again: the old key is gone
    assert gw.upstream.targets() == ["GET /models HTTP/1.1"] * 2


def test_with_tokens_off_no_key_is_asked(tmp_path):
    g = GuardProcess(tmp_path, tokens=False)  # no key_file.json; TorchServe answers calls without a key
    try:
        assert g.request("GET", "/models", key=None)[0] == 200
        assert g.request("POST", "/models?url=my_model.mar", key=None)[0] == 200
        assert "authorization" not in g.upstream.heads[-1].lower()
    finally:
        g.stop()


# --- what must not kill or stall the guard ------------------------------------------------------------------


def test_an_empty_checksum_file_is_a_refusal_with_a_reason(gw):
    open(os.path.join(gw.store, "my_model.mar.sha256"), "w").close()
    status, body = gw.request("POST", "/models?url=my_model.mar")
    assert status == 403 and "is empty or garbled" in body["message"], body  # was: IndexError, no answer


def test_an_internal_error_answers_500(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(guard, "check_archive", broken)
    upstream = Upstream(str(tmp_path / "mgmt.sock"), tokens=False)
    server = guard.GuardServer(("127.0.0.1", 0), str(tmp_path / "mgmt.sock"), str(tmp_path), None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(server.server_address, timeout=10) as s:
            s.sendall(b"POST /models?url=my_model.mar HTTP/1.1\r\nHost: x\r\n\r\n")
            status, body = answer(s.recv(65536))
        assert status == 500 and body["type"] == "InternalServerError"
        assert upstream.targets() == []
    finally:
        server.shutdown()
        server.server_close()
        upstream.sock.close()


def test_the_listen_backlog_takes_a_burst(gw):
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{gw.port}"], capture_output=True, text=True, check=True
    ).stdout
    assert int(out.split()[2]) >= 128, out  # Send-Q of a listening socket is its backlog: was 5


def test_keep_alive_carries_several_calls(gw):
    one = f"GET /models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    raw = gw.send(one * 3)
    assert raw.count(b"HTTP/1.1 200") == 3
    assert gw.upstream.targets() == ["GET /models HTTP/1.1"] * 3


# --- the parsers' cost grows linearly -----------------------------------------------------------------------


def cost(fn, arg, repeat=5) -> float:
    """Best-of CPU seconds of fn(arg), of this thread only."""
    best = float("inf")
    for _ in range(repeat):
        t = time.thread_time()
        fn(arg)
        best = min(best, time.thread_time() - t)
    return best


def baseline(text):
    """A loop that is linear by construction: one step per character."""
    n = 0
    for _ in text:
        n += 1
    return n


def growth(fn, small, large) -> float:
    """How much faster than the linear baseline fn's cost grows from `small` to `large` input (1: linear)."""
    return (cost(fn, large) / cost(fn, small)) / (cost(baseline, large) / cost(baseline, small))


@pytest.mark.parametrize("unit", ["&;", "==;", "=&=;", "a=%C3%A9+&"])
def test_the_query_parser_is_linear(unit):
    small, large = unit * 1_000, unit * 10_000
    assert len(guard_request.netty_params(small)) <= len(small)
    assert growth(guard_request.netty_params, small, large) < 3  # a quadratic parser would give ~10


def test_the_head_parser_is_linear():
    def head(n):  # headers and a target 10x longer, each within the limits
        return b"GET /models?" + b"a=b;" * n + b" HTTP/1.1\r\n" + b"X-A: " + b"b " * n + b"\r\n" * 2

    def parse(raw):
        return guard_request.read_head(io.BytesIO(raw))

    small, large = head(200), head(2_000)
    assert parse(large).target.count(";") == 2_000
    text = lambda raw: raw.decode()
    ratio = (cost(parse, large, 20) / cost(parse, small, 20)) / (
        cost(lambda r: baseline(text(r)), large, 20) / cost(lambda r: baseline(text(r)), small, 20)
    )
    assert ratio < 3


@pytest.mark.parametrize("how", ["a list, not an object", "nested 100,000 deep", "encrypted member"])
def test_a_broken_archive_is_refused_not_a_500(gw, how):
    from tests.test_manifest import broken_mar

    write_checksum(broken_mar(os.path.join(gw.store, "broken.mar"), how))
    status, body = gw.request("POST", "/models?url=broken.mar")
    assert (status, body["type"]) == (403, "RegistrationRefused"), body  # was: 500 InternalServerError


# --- a running canary's lease (deploy/canary_lease.py) ------------------------------------------------------


def fake_ts(folder, user=None):
    """What canary_lease.hold uses of a TorchServe."""
    return types.SimpleNamespace(lease_file=str(folder / "canary.lease"), user=user, lease_token=None)


@pytest.fixture
def lease(gw):
    """my_model 2.0 in a canary against 1.0, held by this test's process, as canary.run holds it."""
    ts = fake_ts(gw.dir)
    held = canary_lease.hold(ts, "my_model", "1.0", "2.0", 600)
    yield held
    canary_lease.release(ts)


GUARDED = [
    ("PUT", "/models/my_model/2.0/set-default"),
    ("PUT", "/models/my_model/1.0/set-default"),
    ("DELETE", "/models/my_model/2.0"),
    ("DELETE", "/models/my%5Fmodel/1.0"),
    ("DELETE", "/models/my_model"),
    ("PUT", "/models/my_model/2.0?min_worker=0"),  # review: scaled to 0 mid-canary, a good candidate fails
    ("PUT", "/models/my_model?min_worker=0"),  # the default's
]
UNGUARDED = [
    ("PUT", "/models/my_model/3.0?min_worker=1"),
    ("PUT", "/models/my_model/3.0/set-default"),
    ("DELETE", "/models/my_model/3.0"),
    ("PUT", "/models/other/2.0/set-default"),
    ("DELETE", "/models/other/1.0"),
    ("GET", "/models/my_model/all"),
]


def test_a_running_canary_refuses_set_default_and_unregister_of_its_versions(gw, lease):
    for method, target in GUARDED:
        status, body = gw.request(method, target)
        # without the lease check: 200 (the call reached TorchServe mid-canary)
        assert (status, body.get("type"), body.get("code")) == (409, "Conflict", 409), (target, body)
        assert (
            f"a canary of my_model 2.0 is running (started {lease['started_at']}, pid {os.getpid()})"
            in (body["message"])
        )
        assert canary_lease.OVERRIDE_HEADER in body["message"]
    assert gw.upstream.targets() == []
    for method, target in UNGUARDED:
        assert gw.request(method, target)[0] == 200, target
    assert len(gw.upstream.targets()) == len(UNGUARDED)


def test_the_rollouts_own_calls_pass_and_its_token_goes_no_further(gw, lease):
    token = {canary_lease.TOKEN_HEADER: lease["token"]}
    for method, target in GUARDED:
        assert gw.request(method, target, token)[0] == 200, target
    assert len(gw.upstream.targets()) == len(GUARDED)
    for head in gw.upstream.heads:  # TorchServe's side never sees the header nor the token
        assert "canary" not in head.lower() and lease["token"] not in head, head
    wrong = {canary_lease.TOKEN_HEADER: "A" * 43}
    assert gw.request("PUT", "/models/my_model/2.0/set-default", wrong)[0] == 409
    for bad in ("short", "A" * 65, "A" * 42 + "!", "A" * 42 + " B"):
        status, body = gw.request("PUT", "/models/my_model/2.0/set-default", {canary_lease.TOKEN_HEADER: bad})
        assert status == 400 and canary_lease.TOKEN_HEADER in body["message"], (bad, body)
    twice = f"{canary_lease.TOKEN_HEADER}: {lease['token']}\r\n" * 2
    raw = f"PUT /models/my_model/2.0/set-default HTTP/1.1\r\nHost: x\r\n{AUTH.decode()}{twice}\r\n"
    assert answer(gw.send(raw.encode()))[0] == 400
    assert len(gw.upstream.targets()) == len(GUARDED)


def test_an_override_passes_and_is_logged(gw, lease):
    why = "node 3 is broken, rolling back by hand (ticket 42)"
    status, _ = gw.request("DELETE", "/models/my_model/2.0", {canary_lease.OVERRIDE_HEADER: why})
    assert status == 200
    assert gw.upstream.targets() == ["DELETE /models/my_model/2.0 HTTP/1.1"]
    logged = [line for line in gw.log_text().splitlines() if why in line]
    assert len(logged) == 1 and f"(uid {os.geteuid()}): DELETE /models/my_model/2.0: override" in logged[0]
    for bad in ('say "yes"', "x" * 201, "", "\\x41"):
        status, body = gw.request("DELETE", "/models/my_model/2.0", {canary_lease.OVERRIDE_HEADER: bad})
        assert status == 400, (bad, body)
    assert len(gw.upstream.targets()) == 1


STALE = {
    "controller gone": lambda sleeper: {"pid": dead_pid()},
    "pid reused": lambda sleeper: {"pid": sleeper, "started": time.time() - 86400},
    "expired": lambda sleeper: {"expires": time.time() - 1},
}


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("how", STALE.keys())
def test_a_stale_lease_blocks_nothing(gw, lease, how):
    held = {**lease, **STALE[how](gw.sleeper.pid)}
    (gw.dir / "canary.lease").write_text(json.dumps(held))
    noted = gw.log_text().count("a stale canary lease does not block it")
    assert gw.request("PUT", "/models/my_model/2.0/set-default")[0] == 200  # a killed controller: not forever
    assert gw.log_text().count("a stale canary lease does not block it") == noted + 1


def test_the_lease_file_is_the_controllers_and_one_at_a_time(tmp_path):
    ts = fake_ts(tmp_path, user="torchserve")
    held = canary_lease.hold(ts, "my_model", "1.0", "2.0", 600)
    st = os.lstat(ts.lease_file)
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 0, ids("torchserve")[1])
    assert ts.lease_token == held["token"] and canary_lease.TOKEN.fullmatch(held["token"])
    with pytest.raises(canary_lease.Busy, match="my_model 2.0 runs already"):
        canary_lease.hold(fake_ts(tmp_path), "my_model", "1.0", "3.0", 600)
    canary_lease.release(ts)
    assert not os.path.lexists(ts.lease_file) and ts.lease_token is None
    (tmp_path / "canary.lease").write_text(json.dumps({**held, "pid": dead_pid()}))
    assert canary_lease.hold(fake_ts(tmp_path), "my_model", "1.0", "3.0", 600)["candidate"] == "3.0"
