"""The HTTPS front door (deploy/frontdoor.py): real HAProxy in front of a real TorchServe on free ports.

TLS with the generated CA, plain HTTP refused, bad input answered as TorchServe answers it, over-size and
chunked bodies refused by the proxy, a full queue and a rate limit answered with Retry-After and JSON, 10,000
mixed requests through it with no wrong answer, and TorchServe unreachable from another network namespace
while the front door is reachable."""

import concurrent.futures
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time

import pytest
import requests

from bench.soak import Soak, bad_bodies, summarize, through_front_door
from deploy import serve, settings
from deploy.frontdoor import FrontDoor, for_server
from deploy.predict import top1
from deploy.server import Ports

pytestmark = [
    pytest.mark.skipif(not (shutil.which("haproxy") or os.path.exists("/usr/sbin/haproxy")), reason="no haproxy"),
]
NS_HOST, NS_PEER = "10.213.77.1", "10.213.77.2"  # the veth pair's addresses: this host, the other namespace


def test_config_is_valid_haproxy_with_every_option(tmp_path):
    door = FrontDoor(backend=9, folder=str(tmp_path), rate=5, names=["localhost", "127.0.0.1"])
    door.write_certs()
    door.write_config()  # raises with HAProxy's own words if it refuses the file
    text = door.haproxy_config()
    assert "maxconn 64" in text and "queue(torchserve) ge 1024" in text and "sc_http_req_rate(0) gt 5" in text
    assert oct(os.stat(door.path("server.pem")).st_mode & 0o777) == "0o600"


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
    d = for_server(soak.ts, port=Ports.free().inference, folder=str(tmp_path_factory.mktemp("door")))
    d.names = ["localhost", "127.0.0.1", NS_HOST]
    try:
        yield d.start()
    finally:
        d.stop()


@pytest.fixture
def small_door(soak, tmp_path):
    """Doors that overflow quickly: start(**settings) -> a running door; stopped after the test."""
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
        f"{door.url()}/predictions/my_model", data=body, headers=soak.headers(), verify=door.ca, timeout=60, **kw
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
        direct = requests.post(f"{soak.ts.url()}/predictions/my_model", data=body, headers=soak.headers(), timeout=60)
        through = post(door, soak, body)
        assert 400 <= direct.status_code < 500, direct.text
        assert (through.status_code, through.json()) == (direct.status_code, direct.json())
    wrong_key = {**soak.headers(), "Authorization": "Bearer wrong"}
    resp = requests.post(f"{door.url()}/predictions/my_model", data=good(soak)[0], headers=wrong_key, verify=door.ca)
    assert resp.status_code == 400 and "Token Authorization failed" in resp.text


def raw_request(door, head: bytes) -> tuple[int, dict, dict]:
    """Send only a request's head (no body) over TLS; the status, headers and JSON body of the answer."""
    ctx = ssl.create_default_context(cafile=door.ca)
    with (
        socket.create_connection(("127.0.0.1", door.port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_text, _, body = data.partition(b"\r\n\r\n")
    lines = head_text.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.mark.slow
@pytest.mark.torchserve
def test_oversize_and_chunked_bodies_are_refused_by_the_proxy(soak, door):
    auth = soak.headers()["Authorization"]
    offset = os.path.getsize(door.log)
    for extra, status in ((f"Content-Length: {door.max_body + 1}", 413), ("Transfer-Encoding: chunked", 411)):
        head = f"POST /predictions/my_model HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\n{extra}\r\n\r\n"
        code, headers, body = raw_request(door, head.encode())
        assert code == status and headers["content-type"] == "application/json" and "message" in body
    # The proxy's log: neither request reached a server (TorchServe never saw them). HAProxy writes a request's
    # line when it closes the session, which can be just after the client has its answer: wait for both.
    deadline = time.monotonic() + 10
    while True:
        with open(door.log) as f:
            f.seek(offset)
            refused = [line for line in f if "status=413" in line or "status=411" in line]
        if len(refused) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(refused) == 2 and all("server=<NOSRV>" in line for line in refused)
    body, label = good(soak)
    assert post(door, soak, body).status_code == 200  # at the limit's right side nothing changed


@pytest.mark.slow
@pytest.mark.torchserve
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

    limited = small_door(rate=5)
    codes = [post(limited, soak, body).status_code for _ in range(20)]
    assert codes[:5] == [200] * 5 and 429 in codes, codes
    r = post(limited, soak, body)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1" and "overloaded" in r.json()["message"]


@pytest.mark.slow
@pytest.mark.torchserve
def test_soak_10k_mixed_requests_through_the_front_door(soak, tmp_path):
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
    assert r["statuses"].get("200", 0) > 0 and sum(n for c, n in r["statuses"].items() if c.startswith("4")) > 0


# --- another network namespace ------------------------------------------------------------------------


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair (NS_HOST here, NS_PEER there); always deleted."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 (ip netns)")
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
        subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=30)  # gone with the netns, mostly


CONNECT = "import socket, sys; print(socket.socket().connect_ex((sys.argv[1], int(sys.argv[2]))))"


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
