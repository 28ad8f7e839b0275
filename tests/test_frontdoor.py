"""The HTTPS front door (deploy/frontdoor.py): real HAProxy in front of a real TorchServe on free ports.

TLS with the generated CA (TLS 1.2 with AEAD suites only), plain HTTP refused, bad input answered as
TorchServe answers it, over-size, chunked and url-encoded bodies and the API description refused by the proxy,
a full queue and a rate limit answered with Retry-After and JSON, slow bodies and idle connections from one
address that leave others served, explanations in their own lane, 10,000 mixed requests through it with no
wrong answer, and TorchServe unreachable from another network namespace while the front door is reachable.

Without haproxy the tests that need it skip, except under CI (env CI set), where they fail: CI installs it."""

import base64
import concurrent.futures
import csv
import io
import json
import os
import resource
import select
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
import requests

from bench.bodies import bad_bodies
from bench.soak import Soak, summarize, through_front_door
from bundle import settings
from deploy import serve
from deploy.client import top1
from deploy.frontdoor import FrontDoor, FrontDoorError, for_server, haproxy, listening
from deploy.haproxy_config import json_reply
from deploy.server import Ports
from model_src.oip import model_metadata
from tests.conftest import cannot_run, free_port, require_tool

# in_order: the tests share one module-scoped server (or door) and build on each other's effects
pytestmark = pytest.mark.in_order

NS_HOST, NS_PEER = "10.213.77.1", "10.213.77.2"  # the veth pair's addresses: this host, the other namespace


def require_haproxy():
    """Where haproxy is found is deploy.frontdoor.haproxy()'s; whether its absence skips or fails (under CI)
    is require_tool's, whose own test checks that decision."""
    try:
        haproxy()
    except FrontDoorError:
        require_tool("haproxy")


def test_config_is_valid_haproxy_with_every_option(tmp_path):
    require_haproxy()
    door = FrontDoor(backend=9, folder=str(tmp_path), rate=5, names=["localhost", "127.0.0.1"])
    door.write_certs()
    door.write_config()  # raises with HAProxy's own words if it refuses the file
    text = door.haproxy_config()
    assert "maxconn 64" in text and "queue(torchserve) ge 1024" in text and "sc_http_req_rate(0) gt 5" in text
    assert (
        "sc0_conn_cur gt 256" in text and "wait-for-body time 10s" in text and "queue(explain) ge 8" in text
    )
    assert oct(os.stat(door.path("server.pem")).st_mode & 0o777) == "0o600"


def test_a_model_with_5000_classes_keeps_a_valid_config(tmp_path):
    require_haproxy()
    many = model_metadata("big", ["1.0"], [f"class number {i}" for i in range(5000)], {"image_size": 28})
    few = model_metadata("small", ["1.0"], ["cat", "dog"], {})
    door = FrontDoor(backend=9, folder=str(tmp_path), names=["localhost"], models={"big": many, "small": few})
    door.write_certs()
    door.write_config()  # was: FrontDoorError: HAProxy refuses the 104 KB oip-big.json
    with open(door.oip_file("big")) as f:
        big = json.load(f)
    assert "classes" not in big["outputs"][0]["parameters"] and big["inputs"] == many["inputs"]
    with open(door.oip_file("small")) as f:
        assert json.load(f) == few


def test_front_door_and_expose_inference_are_refused_together(capsys):
    with pytest.raises(SystemExit):
        serve.main(["start", "--front-door", "--expose-inference"])
    assert "--front-door keeps TorchServe on loopback" in capsys.readouterr().err


def test_a_real_certificate_is_taken_from_the_command_line_only_for_the_front_door(capsys, tmp_path):
    for argv, message in (
        (["start", "--cert", str(tmp_path / "x.pem")], "add --front-door"),
        (["start", "--front-door", "--cert", str(tmp_path / "missing.pem")], "no such file"),
    ):
        with pytest.raises(SystemExit):
            serve.main(argv)
        assert message in capsys.readouterr().err


HOSTILE = 'it\'s "quoted", a back\\slash, $HOME, # no comment, {"json": [1]}, caf\u00e9'


def test_json_replies_read_back_as_their_message(tmp_path):
    """json_reply() escapes for JSON, then for HAProxy's configuration: the body HAProxy sends parses back."""
    require_haproxy()
    port = free_port()
    (tmp_path / "h.cfg").write_text(
        "defaults\n    mode http\n    timeout client 5s\n    timeout server 5s\n    timeout connect 5s\n"
        f"frontend f\n    bind 127.0.0.1:{port}\n    http-request return "
        f"{json_reply(429, 'Odd', HOSTILE, 3)}\n"
    )
    proc = subprocess.Popen(
        [haproxy(), "-db", "-f", str(tmp_path / "h.cfg")], stderr=subprocess.PIPE, text=True
    )
    try:
        for _ in range(100):  # bounded: 10 s
            if proc.poll() is not None or listening("127.0.0.1", port):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()
        resp = requests.get(f"http://127.0.0.1:{port}/", timeout=10)
    finally:
        proc.terminate()
        proc.wait(10)
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "3"
    assert resp.json() == {"code": 429, "type": "Odd", "message": HOSTILE}


@pytest.fixture
def bare_door(tmp_path):
    """A front door on 127.0.0.1 before a port where nothing listens: enough for what TLS offers."""
    require_haproxy()
    door = FrontDoor(
        backend=free_port(), port=free_port(), bind="127.0.0.1", folder=str(tmp_path), names=["localhost"]
    )
    try:
        yield door.start()
    finally:
        door.stop()


def tls12_cipher(door, ciphers: str) -> str | None:
    """The suite a TLS 1.2 client offering only `ciphers` gets from the door; None when the handshake
    fails."""
    ctx = ssl.create_default_context(cafile=door.ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers + ":@SECLEVEL=0")  # the client offers them all; the door decides
    try:
        with (
            socket.create_connection(("127.0.0.1", door.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            return s.cipher()[0]
    except ssl.SSLError:
        return None


def test_tls12_offers_only_aead_suites(bare_door):
    for aead in (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ):
        assert tls12_cipher(bare_door, aead) == aead
    for cbc in (
        "ECDHE-ECDSA-AES128-SHA",
        "ECDHE-ECDSA-AES256-SHA",
        "ECDHE-ECDSA-AES128-SHA256",
        "AES128-SHA",
    ):
        assert tls12_cipher(bare_door, cbc) is None, cbc


# --- against a real TorchServe ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def soak(checkpoint, digits, tmp_path_factory):
    """One TorchServe (my_model 1.0) for the module; Soak knows its good and bad bodies and their answers."""
    s = Soak(checkpoint, str(tmp_path_factory.mktemp("frontdoor")))
    try:
        s.start()
        yield s
    finally:
        s.ts.stop()


@pytest.fixture(scope="module")
def door(soak, tmp_path_factory):
    """The front door on 0.0.0.0 (free port); its certificate also names the netns test's address."""
    require_haproxy()
    d = for_server(soak.ts, port=Ports.free().inference, folder=str(tmp_path_factory.mktemp("door")))
    d.names = ["localhost", "127.0.0.1", NS_HOST]
    try:
        yield d.start()
    finally:
        d.stop()


@pytest.fixture
def small_door(soak, tmp_path):
    """Doors that overflow quickly: start(**settings) -> a running door; stopped after the test."""
    require_haproxy()
    started = []

    def start(**kw):
        d = for_server(soak.ts, port=Ports.free().inference, folder=str(tmp_path / str(len(started))), **kw)
        d.bind, d.names = "127.0.0.1", ["localhost"]
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.stop()


def post(door, soak, body, **kw):
    return requests.post(
        f"{door.url()}/predictions/my_model",
        data=body,
        headers=soak.headers(),
        verify=door.ca,
        timeout=60,
        **kw,
    )


def good(soak):
    return soak.good[0][0], soak.expected_labels[0]


@pytest.mark.slow
@pytest.mark.torchserve
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_with_generated_ca_answers_and_plain_http_is_refused(soak, door):
    body, label = good(soak)
    resp = post(door, soak, body)
    assert resp.status_code == 200 and top1(resp.json()) == label  # the Bearer key passed unchanged
    with pytest.raises(requests.exceptions.SSLError):  # the system's CAs do not know the local one
        requests.post(f"{door.url()}/predictions/my_model", data=body, headers=soak.headers(), timeout=30)
    with pytest.raises(requests.ConnectionError):  # plain HTTP on the public port: no answer at all
        requests.get(f"http://127.0.0.1:{door.port}/ping", headers=soak.headers(), timeout=30)
    with socket.create_connection(("127.0.0.1", door.port)) as s:  # TLS 1.1 is refused
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(s)
    log = open(door.log).read()
    assert "status=200" in log and "ms=" in log  # access log with latency


@pytest.mark.slow
@pytest.mark.torchserve
def test_bad_input_gets_the_same_4xx_as_direct(soak, door):
    for body in bad_bodies():
        direct = requests.post(
            f"{soak.ts.url()}/predictions/my_model", data=body, headers=soak.headers(), timeout=60
        )
        through = post(door, soak, body)
        assert 400 <= direct.status_code < 500, direct.text
        assert (through.status_code, through.json()) == (direct.status_code, direct.json())
    wrong_key = {**soak.headers(), "Authorization": "Bearer wrong"}
    resp = requests.post(
        f"{door.url()}/predictions/my_model", data=good(soak)[0], headers=wrong_key, verify=door.ca
    )
    assert resp.status_code == 400 and "Token Authorization failed" in resp.text


def exchange(door, request: bytes, source: str = "127.0.0.1", timeout: float = 30) -> tuple[int, dict, bytes]:
    """Send raw bytes over TLS from a loopback address; the status, headers and body of the answer (the
    request should say `Connection: close`, or be one the proxy refuses)."""
    ctx = ssl.create_default_context(cafile=door.ca)
    with (
        socket.create_connection(
            ("127.0.0.1", door.port), timeout=timeout, source_address=(source, 0)
        ) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return parse_answer(data)


def parse_answer(data: bytes) -> tuple[int, dict, bytes]:
    head_text, _, body = data.partition(b"\r\n\r\n")
    lines = head_text.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def raw_request(door, head: bytes) -> tuple[int, dict, dict]:
    """Send only a request's head (no body) over TLS; the status, headers and JSON body of the answer."""
    code, headers, body = exchange(door, head)
    return code, headers, json.loads(body)


def head(soak, path="/predictions/my_model", ctype="application/octet-stream", length=0, key=True) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", "Connection: close", f"Content-Length: {length}"]
    lines += [f"Content-Type: {ctype}"] if ctype else []
    lines += [f"Authorization: {soak.headers()['Authorization']}"] if key else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def refused_lines(door, offset: int, statuses: tuple[int, ...], expected: int) -> list[str]:
    """The access log's lines with these statuses after `offset`. HAProxy writes a request's line when it
    closes the session, which can be just after the client has its answer: wait (bounded) for `expected` of
    them."""
    deadline = time.monotonic() + 10
    while True:
        with open(door.log) as f:
            f.seek(offset)
            lines = [line for line in f if any(f"status={code} " in line for code in statuses)]
        if len(lines) >= expected or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.torchserve
def test_oversize_and_chunked_bodies_are_refused_by_the_proxy(soak, door):
    auth = soak.headers()["Authorization"]
    offset = os.path.getsize(door.log)
    for extra, status in ((f"Content-Length: {door.max_body + 1}", 413), ("Transfer-Encoding: chunked", 411)):
        head = (
            "POST /predictions/my_model HTTP/1.1\r\nHost: localhost\r\nAuthorization: "
            f"{auth}\r\n{extra}\r\n\r\n"
        )
        code, headers, body = raw_request(door, head.encode())
        assert code == status and headers["content-type"] == "application/json" and "message" in body
    refused = refused_lines(door, offset, (413, 411), 2)  # neither request reached a server
    assert len(refused) == 2 and all("server=<NOSRV>" in line for line in refused)
    body, label = good(soak)
    assert post(door, soak, body).status_code == 200  # at the limit's right side nothing changed


@pytest.mark.slow
@pytest.mark.torchserve
def test_kserve_forms_through_the_door_no_5xx_right_answers(soak, door, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", door.ca)  # the load generator's sessions trust the door's CA
    r = soak.kserve(requests=600, concurrency=8, url=door.url())
    print(summarize("kserve", r))
    assert r["errors"] == 0 and r["wrong_labels"] == 0, (r["statuses"], r["first_error"])
    assert (
        r["statuses"].get("200", 0) > 0 and sum(n for c, n in r["statuses"].items() if c.startswith("4")) > 0
    )


def test_full_queue_and_rate_limit_answer_json_with_retry_after_and_lose_nothing(soak, small_door):
    body, label = good(soak)
    tight = small_door(maxconn=1, queue=2)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: post(tight, soak, body), range(96)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
    for r in answers:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "1" and r.json()["message"] == "overloaded, retry after 1 s"
        else:
            assert top1(r.json()) == label
    assert post(tight, soak, body).status_code == 200  # the overload left nothing behind

    # 5 per hour: the 6th is over, however slow the requests are
    limited = small_door(rate=5, rate_period=3600)
    codes = [post(limited, soak, body).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429], codes
    r = post(limited, soak, body)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1" and "overloaded" in r.json()["message"]


def multipart(data: bytes, boundary: str = "b0undary") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


@pytest.mark.slow
@pytest.mark.torchserve
def test_only_the_media_types_the_handler_reads_pass(soak, door):
    """Finding 9: Netty form-decodes url-encoded bodies before the key is checked (16 MB: 5.7 s of CPU, +2.1
    GB)."""
    png, label = good(soak)
    offset = os.path.getsize(door.log)
    form = b"a=" + b"x%41" * 100
    for ctype in (
        "application/x-www-form-urlencoded",
        "Application/X-WWW-Form-Urlencoded; charset=utf-8",
        "text/html",
    ):
        code, headers, body = exchange(door, head(soak, ctype=ctype, length=len(form)) + form)
        assert (code, json.loads(body)["type"]) == (415, "UnsupportedMediaType"), ctype
    twice = head(soak, length=len(png)).replace(
        b"\r\n\r\n", b"\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\n"
    )
    assert exchange(door, twice + png)[0] == 400
    big_form = head(soak, ctype="multipart/form-data; boundary=b0undary", length=door.max_form + 1)
    assert exchange(door, big_form)[0] == 413  # refused on its head: the body is never read
    assert all("server=<NOSRV>" in line for line in refused_lines(door, offset, (415, 400, 413), 5))
    b64 = base64.b64encode(png)
    for ctype, body in (
        (None, png),  # curl -T sends none
        ("application/octet-stream", png),
        ("image/png", png),
        ("application/json; charset=utf-8", json.dumps({"data": b64.decode()}).encode()),
        ("text/plain", b64),
        ("multipart/form-data; boundary=b0undary", multipart(png)),
    ):
        code, _, answer = exchange(door, head(soak, ctype=ctype, length=len(body)) + body)
        assert code == 200 and top1(json.loads(answer)) == label, (ctype, answer)


@pytest.mark.slow
@pytest.mark.torchserve
def test_the_api_description_is_refused_at_the_door(soak, door):
    direct = requests.options(soak.ts.url(), timeout=30)  # TorchServe answers it, without a key
    assert direct.status_code == 200 and "openapi" in direct.text
    for method, path in (("OPTIONS", "/"), ("GET", "/api-description"), ("GET", "/%61pi-description/")):
        request = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        code, headers, body = exchange(door, request)
        assert (code, json.loads(body)["type"]) == (404, "NotFound"), (method, path)


def read_answer(s: ssl.SSLSocket) -> tuple[int, dict, bytes] | OSError:
    s.settimeout(10)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError as e:
        if not data:
            return e
    return parse_answer(data)


@pytest.mark.slow
@pytest.mark.torchserve
def test_slow_bodies_get_408_and_leave_the_door_open_to_others(soak, small_door):
    """Finding 6: 20 connections from 127.0.0.2 send the head of a 1 MB body, then a byte a second, with 2
    slots in TorchServe. Each body must arrive whole before its request is queued: they get 408 and take no
    slot, and a request from 127.0.0.3 is answered meanwhile (it waited for a slot and got 503 after 10 s
    before)."""
    door = small_door(maxconn=2)
    ctx = ssl.create_default_context(cafile=door.ca)
    slow = []
    for _ in range(20):
        raw = socket.create_connection(("127.0.0.1", door.port), timeout=10, source_address=("127.0.0.2", 0))
        slow.append(ctx.wrap_socket(raw, server_hostname="localhost"))
        slow[-1].sendall(head(soak, length=1 << 20, key=False))
    answers = {}
    done = threading.Event()

    def trickle():  # one byte a second on each, until it is answered; 30 rounds at most
        for _ in range(30):
            for i, s in enumerate(slow):
                if i not in answers and (s.pending() or select.select([s], [], [], 0)[0]):
                    answers[i] = read_answer(s)
                elif i not in answers:
                    s.send(b"x")
            if len(answers) == len(slow) or done.wait(1):
                return

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        done.wait(2)  # the slow ones are in
        body, label = good(soak)
        code, _, answer = exchange(door, head(soak, length=len(body)) + body, source="127.0.0.3")
    finally:
        thread.join()
        for s in slow:
            s.close()
    assert code == 200 and top1(json.loads(answer)) == label, answer
    assert len(answers) == 20 and all(a[0] == 408 for a in answers.values()), answers
    assert {json.loads(a[2])["type"] for a in answers.values()} == {"RequestTimeout"}


@pytest.mark.slow
@pytest.mark.torchserve
def test_many_idle_connections_from_one_address_leave_the_door_open_to_others(soak, small_door):
    """Finding 6: 4,300 TCP connections from 127.0.0.2 that never start TLS, more than HAProxy's 4096 at once
    (a request from elsewhere timed out before). One address holds at most per_source of them; the door closes
    the rest at once and those after the handshake timeout, while a request from 127.0.0.3 is answered."""
    door = small_door()
    n = 4300
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 500:
        assert hard >= n + 500, f"RLIMIT_NOFILE {hard}: the test needs {n + 500} descriptors"
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 500, hard))
    idle = []
    try:
        for _ in range(n):
            idle.append(socket.socket())
            idle[-1].setblocking(False)
            idle[-1].bind(("127.0.0.2", 0))
            idle[-1].connect_ex(("127.0.0.1", door.port))
        body, label = good(soak)
        code, _, answer = exchange(door, head(soak, length=len(body)) + body, source="127.0.0.3", timeout=20)
        assert code == 200 and top1(json.loads(answer)) == label
        # a connection waits in the backlog until the door accepts it, and its handshake timeout starts then:
        # on a loaded 2-core machine the last of 4,300 are accepted late
        open_ports = wait_closed(idle, deadline=time.monotonic() + door.handshake_timeout + 30)
        held = held_by(door.port) & open_ports
        assert not held, f"{len(held)} of the {len(open_ports)} sockets still open are held by the door"
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def wait_closed(socks: list[socket.socket], deadline: float) -> set[int]:
    """Read each socket until its peer closes it, up to the deadline; the local ports of the accepted ones
    that stayed open."""
    poll, by_fd = select.poll(), {s.fileno(): s for s in socks}
    for fd in by_fd:
        poll.register(fd, select.POLLIN)
    while by_fd and time.monotonic() < deadline:
        for fd, _ in poll.poll(500):
            try:
                if by_fd[fd].recv(4096):
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass
            poll.unregister(fd)
            del by_fd[fd]
    return {s.getsockname()[1] for s in by_fd.values() if established(s)}


def held_by(port: int) -> set[int]:
    """The client ports of the connections the kernel holds for the listener on `port` (ESTABLISHED, accepted
    or waiting to be), from /proc/net/tcp. A client can think itself connected when the server side does not
    exist: with SYN cookies, the final ACK that meets a full accept queue is dropped, and nothing tells the
    client (one of 4,300 stayed "open" this way on a quiet runner, far past every timeout of the door)."""
    held = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, remote, state = line.split()[1:4]
            if state == "01" and int(local.split(":")[1], 16) == port:
                held.add(int(remote.split(":")[1], 16))
    return held


def established(s: socket.socket) -> bool:
    """Whether the connection was ever accepted: one whose SYN the full backlog dropped is still retrying, and
    the door cannot hold (or close) what it never accepted."""
    try:
        s.getpeername()
        return True
    except OSError:
        return False


def lanes(door) -> dict[str, dict]:
    """HAProxy's own counters per lane (its stats socket): stot requests sent, smax most inside at once."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(door.path("admin.sock"))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = list(csv.DictReader(io.StringIO(data.decode().lstrip("# "))))
    return {row["pxname"]: row for row in rows if row["svname"] == "torchserve"}


@pytest.mark.slow
@pytest.mark.torchserve
def test_explanations_take_their_own_lane_one_at_a_time(soak, small_door):
    """Finding 7: explanations (seconds each on a large model) never take the slots predictions need."""
    door = small_door()
    body, label = good(soak)
    explain = ["/explanations/my_model"] * 5 + ["/%65xplanations/my_model"]  # Netty decodes the path
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        jobs = [pool.submit(exchange, door, head(soak, path=p, length=len(body)) + body) for p in explain]
        jobs += [pool.submit(exchange, door, head(soak, length=len(body)) + body) for _ in range(12)]
    assert [job.result()[0] for job in jobs] == [200] * 18
    assert all(top1(json.loads(job.result()[2])) == label for job in jobs[6:])
    big = noise_png(400)  # 160 KB, larger than the buffer: it streams
    assert exchange(door, head(soak, length=len(big)) + big)[0] == 200
    stats = lanes(door)
    assert {lane: int(stats[lane]["stot"]) for lane in ("torchserve", "explain", "bulk")} == {
        "torchserve": 12,
        "explain": 6,
        "bulk": 1,
    }
    assert int(stats["explain"]["smax"]) == 1  # six at once, one inside
    again = head(soak, path=explain[0], length=len(body)) + body
    assert [exchange(door, again)[0] for _ in range(door.explain_rate - 6)] == [200] * (door.explain_rate - 6)
    code, headers, answer = exchange(door, again)  # one more than explain_rate from this address this period
    assert code == 429 and headers["retry-after"] == "1" and "explanations" in json.loads(answer)["message"]


def noise_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("L", (side, side), os.urandom(side * side)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.torchserve
def test_soak_10k_mixed_requests_through_the_front_door(soak, tmp_path):
    require_haproxy()
    before = os.environ.get("REQUESTS_CA_BUNDLE")
    door = through_front_door(soak, str(tmp_path / "door"))
    try:
        r = soak.load(requests=10000, concurrency=32, warmup=200)
    finally:
        door.stop()
        soak.base_url = None
        os.environ.pop("REQUESTS_CA_BUNDLE")
        if before:
            os.environ["REQUESTS_CA_BUNDLE"] = before
    print("through the front door:", summarize("load", r))
    assert r["requests"] == 10000 and r["errors"] == 0 and r["wrong_labels"] == 0, r["statuses"]
    assert (
        r["statuses"].get("200", 0) > 0 and sum(n for c, n in r["statuses"].items() if c.startswith("4")) > 0
    )


# --- another network namespace ------------------------------------------------------------------------


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair (NS_HOST here, NS_PEER there); always deleted."""
    require_tool("ip")
    if os.geteuid() != 0:
        cannot_run("network namespaces need root")
    name, veth = f"fdtest{os.getpid()}", f"fdv{os.getpid() % 100000}"
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"],
        ["ip", "link", "set", veth + "p", "netns", name],
        ["ip", "addr", "add", f"{NS_HOST}/30", "dev", veth],
        ["ip", "link", "set", veth, "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", f"{NS_PEER}/30", "dev", veth + "p"],
        ["ip", "netns", "exec", name, "ip", "link", "set", veth + "p", "up"],
        ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        # gone with the netns, mostly
        subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=30)


# A port whose packets are dropped (the firewall keeps gRPC management from other hosts) never answers: 5 s is
# "not reachable" too, as a refusal is.
CONNECT = "import socket, sys; s = socket.socket(); "
CONNECT += "s.settimeout(5); print(s.connect_ex((sys.argv[1], int(sys.argv[2]))))"


@pytest.mark.slow
@pytest.mark.torchserve
def test_only_the_front_door_is_reachable_from_another_network_namespace(soak, door, netns):
    def connect(port):  # from inside the namespace: 0 when a connection opens
        cmd = ["ip", "netns", "exec", netns, sys.executable, "-c", CONNECT, NS_HOST, str(port)]
        return int(subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout)

    ts_ports = {name: port for name, port in vars(soak.ts.ports).items()}
    assert {name: connect(port) == 0 for name, port in ts_ports.items()} == dict.fromkeys(ts_ports, False)
    assert connect(door.port) == 0
    # A real answer from the other namespace, with the key on stdin and the generated CA.
    image = os.path.join(door.folder, "image.png")
    with open(image, "wb") as f:
        f.write(good(soak)[0])
    curl = ["ip", "netns", "exec", netns, "curl", "-sS", "--cacert", door.ca, "-H", "@-", "-T", image]
    out = subprocess.run(
        [*curl, f"https://{NS_HOST}:{door.port}/predictions/my_model"],
        input=f"Authorization: {soak.headers()['Authorization']}\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert top1(json.loads(out.stdout)) == good(soak)[1]


@pytest.mark.slow
@pytest.mark.torchserve
def test_serve_cli_starts_reports_and_stops_the_front_door(soak, tmp_path, monkeypatch, capsys):
    """scripts/serve.sh's path, on this module's server (last in the file: it restarts that server)."""
    monkeypatch.setattr(settings, "FRONT_DOOR_PORT", Ports.free().inference)
    monkeypatch.setattr(settings, "FRONT_DOOR_DIR", str(tmp_path / "frontdoor"))
    monkeypatch.setattr(serve, "TorchServe", lambda **kw: soak.ts)
    require_haproxy()
    door = FrontDoor(backend=soak.ts.ports.inference, names=["localhost"])
    try:
        serve.main(["restart", "--front-door"])
        out = capsys.readouterr().out
        assert "TorchServe started" in out and f"Front door is running (pid {door.pid()})" in out
        assert f"--cacert {os.path.relpath(door.ca)} -T IMAGE https://localhost:{door.port}/" in out
        body, label = good(soak)
        resp = post(door, soak, body)
        assert resp.status_code == 200 and top1(resp.json()) == label
        serve.main(["stop"])
        assert capsys.readouterr().out.splitlines()[:2] == ["front door stopped", "TorchServe stopped"]
        assert not door.is_running() and not soak.ts.is_running()
    finally:
        door.stop()
