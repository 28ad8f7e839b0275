"""Shadow through the real front door: 2.0 (1.0's weights) mirrored beside 1.0 agrees on ~every request, a
version with permuted labels on ~none, and every user answer is the default's. Unit tests of the tee's
parser (strict framing, a cost that grows linearly) and of its 502 when TorchServe does not answer."""

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
import requests

from deploy import management, register_version, shadow, shadow_tee
from deploy.canary_readings import stat_rows
from deploy.frontdoor import FrontDoor
from deploy.guard_request import Refusal
from deploy.versions import register, set_default, state_dir
from tests.conftest import free_port, install_archive
from tests.test_canary import Load, bodies, door, permuted  # noqa: F401 (fixtures)

HEAD = b"POST /predictions/my_model HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"


def parse(raw: bytes, max_body: int = 100):
    return shadow_tee.read_request(io.BytesIO(raw), max_body)


def test_the_tee_reads_one_strictly_framed_prediction():
    req = parse(HEAD + b"Authorization: Bearer k\r\nX-Other: y\r\nContent-Length: 3\r\n\r\nabc")
    assert req == shadow_tee.Prediction("application/octet-stream", "Bearer k", b"abc")  # X-Other: not kept


def test_the_tee_takes_what_the_door_passes_and_reads_only_its_own_headers():
    """Review: the guard's reader refused a second X-Forwarded-For (a client's, beside the door's), a UTF-8
    User-Agent or 70 header lines, all of which the door answers: each was a 400 for the tee's share."""
    others = b"X-Forwarded-For: 9.9.9.9\r\nX-Forwarded-For: 10.0.0.1\r\nUser-Agent: caf\xc3\xa9\r\n"
    others += b"".join(b"X-H%d: v\r\n" % i for i in range(70))
    binary = b"Inference-Header-Content-Length: 2\r\n"
    req = parse(HEAD + others + binary + b"Authorization: Bearer k\r\nContent-Length: 3\r\n\r\nabc")
    assert req == shadow_tee.Prediction("application/octet-stream", "Bearer k", b"abc", "2")
    for bad in (b"Authorization: a\r\nAuthorization: b\r\n", b"Inference-Header-Content-Length: -1\r\n"):
        with pytest.raises(Refusal) as e:
            parse(HEAD + bad + b"Content-Length: 3\r\n\r\nabc")
        assert e.value.status == 400


def test_only_label_maps_are_compared():
    """Review: the first key of a KServe v1/v2 answer ("predictions", "id") is the same for any two versions,
    and two answers that are no object both gave None: either counted as agreement."""
    assert shadow_tee.top1(200, b'{"3": 0.9, "8": 0.1}') == "3"
    assert shadow_tee.top1(200, b'{"predictions": [{"3": 0.9}]}') is None
    assert shadow_tee.top1(200, b'[{"3": 0.9}]') is None
    pairs = [
        {"default_top1": None, "candidate_top1": None, "default_ms": 1.0, "candidate_ms": 1.0,
         "candidate_status": 200},
        {"default_top1": "3", "candidate_top1": "8", "default_ms": 1.0, "candidate_ms": 1.0,
         "candidate_status": 200},
    ]  # fmt: skip
    out = shadow.summary(pairs, 0)
    assert out["agreement"] == 0.0 and out["unjudged"] == 1, out


@pytest.mark.parametrize(
    "extra, status",
    [
        (b"Content-Length: 3\r\nContent-Length: 3\r\n", 400),
        (b"Content-Length: 3\r\ncontent-length: 4\r\n", 400),
        (b"Transfer-Encoding: chunked\r\n", 400),
        (b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Content-Length: 101\r\n", 413),  # over the door's small-body limit (100 here)
        (b"Content-Length: 99999999\r\n", 413),  # over the guard's reader's own limit
        (b"Content-Length: 5\r\n", 400),  # the body ends early
    ],
)
def test_the_tee_refuses_what_it_cannot_frame(extra, status):
    with pytest.raises(Refusal) as e:
        parse(HEAD + extra + b"\r\nabc")
    assert e.value.status == status, e.value.message


def operations(raw: bytes) -> int:
    """Python calls and C calls made while the tee parses `raw`, plus the bytes it reads: its work, without a
    clock."""
    events, read = [0], [0]

    class Counted(io.BytesIO):
        def readline(self, size=-1):
            line = super().readline(size)
            read[0] += len(line)
            return line

        def read(self, size=-1):
            data = super().read(size)
            read[0] += len(data)
            return data

    def count(frame, event, arg):
        events[0] += 1

    sys.setprofile(count)
    try:
        shadow_tee.read_request(Counted(raw), 100)
    finally:
        sys.setprofile(None)
    return events[0] + read[0]


@pytest.mark.parametrize("shape", ["many headers", "long values"])
def test_the_tee_parsers_work_grows_linearly_with_hostile_headers(shape):
    def request(n):  # 10x the hostile header bytes, each within the reader's limits
        if shape == "many headers":
            hostile = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(n))
        else:
            hostile = b"X-H: " + b"a " * (n * 60) + b"\r\n"
        return HEAD + hostile + b"Content-Length: 3\r\n\r\nabc", len(hostile)

    (small, s_bytes), (large, l_bytes) = request(6), request(60)
    assert 9 < l_bytes / s_bytes < 11
    growth = operations(large) / operations(small)
    assert growth < 15, growth  # linear: ~10x (a quadratic parser: ~100x)


def test_the_door_never_sends_to_the_tee_by_itself():
    config = FrontDoor(backend=9)
    section = config.canary_sections()
    assert f"    server shadow unix@{config.tee_socket} weight 0 maxconn 8\n" in section, section


def test_no_other_local_user_can_take_the_tees_name(tmp_path):
    """A TCP port for the tee is free between runs and after a tee killed with -9: any local user could bind
    it and receive the users' keys. The tee's Unix socket lies in a folder only its owner writes; `nobody`
    can neither bind the name while the tee is gone nor replace the folder's socket."""
    path = str(tmp_path / "door" / "tee.sock")
    tee = shadow_tee.Tee(free_port(), "my_model", "2.0", 100, 5, path)
    tee.server.server_close()  # gone, as after -9: the socket file stays, nothing listens
    os.chmod(tmp_path, 0o711)  # nobody may reach the folder, as HAProxy's user does
    folder = os.stat(os.path.dirname(path))
    assert folder.st_uid == os.geteuid() and not folder.st_mode & 0o022
    if os.geteuid() != 0:
        return  # the rest needs another user to try
    squat = "import os, socket, sys; os.unlink(sys.argv[1]) if sys.argv[2] == 'replace' else None; "
    squat += "socket.socket(socket.AF_UNIX).bind(sys.argv[1])"
    for how in ("bind", "replace"):
        tried = subprocess.run(
            [sys.executable, "-c", squat, path, how], user="nobody", capture_output=True, text=True
        )
        assert tried.returncode != 0 and "PermissionError" in tried.stderr, (how, tried.stderr[-300:])


@pytest.mark.parametrize("other", [["--canary", "5,100"], ["--promote"], ["--dry-run"]])
def test_shadow_goes_alone_on_the_command_line(other, capsys):
    args = register_version.get_args_parser().parse_args(["register", "x.mar", "--shadow", "10", *other])
    assert args.shadow == 10 and register_version.cmd_register(None, args) == 2  # before any server call
    assert "--shadow goes alone" in capsys.readouterr().err


def test_copies_past_the_queue_are_dropped_and_counted(tmp_path):
    tee = shadow_tee.Tee(free_port(), "my_model", "2.0", 100, 5, str(tmp_path / "tee" / "tee.sock"))
    # not started: nothing takes copies out
    try:
        for _ in range(shadow_tee.QUEUE + 3):
            tee.mirror(shadow_tee.Prediction(None, None, b"x"), "3", 1.0)
    finally:
        tee.server.server_close()
    assert tee.dropped == 3 and tee.copies.qsize() == shadow_tee.QUEUE


def test_a_tee_that_cannot_reach_torchserve_answers_502_json(tmp_path):
    path = str(tmp_path / "tee" / "tee.sock")
    tee = shadow_tee.Tee(free_port(), "my_model", "2.0", 100, 5, path).start()  # no backend
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(HEAD + b"Content-Length: 3\r\n\r\nabc")
            raw = s.makefile("rb").read()
    finally:
        tee.stop()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), raw[:200]
    assert json.loads(body)["type"] == "BadGateway" and tee.pairs == []


# --- through the real door, with a real TorchServe --------------------------------------------------------


def user_answers_are_the_defaults(load, bodies):  # noqa: F811
    statuses = Counter(status for status, _, _ in load.answers)
    assert set(statuses) == {200}, statuses
    seen = {label: Counter(top for _, top, lb in load.answers if lb == label) for _, label in bodies}
    return seen


@pytest.mark.slow
@pytest.mark.torchserve
def test_shadow_reports_agreement_and_users_only_get_the_default(
    server,
    store,
    door,  # noqa: F811
    archive_factory,
    bodies,  # noqa: F811
):
    set_default(server, "my_model", "1.0", reason="test: 1.0 is the default")
    headers = {**server.auth("inference"), "Content-Type": "application/octet-stream"}
    usual = {}  # the default's own label for each body, asked directly
    for body, label in bodies:
        resp = requests.post(
            f"{door.url()}/predictions/my_model", data=body, headers=headers, verify=door.ca, timeout=60
        )
        usual[label] = next(iter(resp.json()))
    register(server, install_archive(archive_factory("2.0"), store))
    register(server, permuted(store, os.path.join(str(store), "my_model.mar"), "3.0"))
    reports = {}
    for version in ("2.0", "3.0"):
        with Load(door, server, bodies) as load:
            reports[version] = shadow.run(server, door, "my_model", version, 50, pairs=20, max_seconds=120)
        print(json.dumps(reports[version], indent=1))
        seen = user_answers_are_the_defaults(load, bodies)
        # every user answer is the default's label: the permuted candidate's ("4" for a 3) never reaches one
        assert all(set(tops) == {usual[label]} for label, tops in seen.items()), (seen, usual)
    same, other = reports["2.0"], reports["3.0"]
    for r in (same, other):
        assert r["ended_by"] == "20 pairs" and r["pairs"] >= 20 and r["candidate_errors"] == 0, r
        assert r["answer_time_ratio"] > 0 and r["files"][0].startswith(
            os.path.join(state_dir(server), "shadow")
        )
        assert os.path.exists(r["files"][0])
    assert same["agreement"] >= 0.95 and other["agreement"] <= 0.05, (same["agreement"], other["agreement"])
    # never promoted, both still registered; the split closed
    assert management.default_version(server, "my_model") == "1.0"
    assert {"2.0", "3.0"} <= {v["modelVersion"] for v in management.versions(server, "my_model")}
    assert not shadow.in_place(door, "my_model", 50)


@pytest.mark.slow
@pytest.mark.torchserve
def test_a_tee_that_is_gone_leaves_every_request_on_the_default(server, door, bodies):  # noqa: F811
    """The split open towards a tee that died (its socket file left, nothing listening): the door retries
    each refused connection on the default, and every user answer is still 200."""
    set_default(server, "my_model", "1.0", reason="test: 1.0 is the default")
    refused = redispatched(door)
    shadow_tee.listen(door.tee_socket).server_close()
    shadow.open_split(door, "my_model", "1.0", 50)
    try:
        with Load(door, server, bodies) as load:
            for _ in range(40):
                if len(load.answers) >= 40:
                    break
                time.sleep(0.5)
    finally:
        shadow.close_split(door)
    assert len(load.answers) >= 10
    user_answers_are_the_defaults(load, bodies)
    assert redispatched(door) > refused  # the tee's share was tried there, then on the default


def redispatched(door) -> int:  # noqa: F811
    rows = [r for r in stat_rows(door) if (r.get("pxname"), r.get("svname")) == ("canary", "shadow")]
    return sum(int(r.get("wredis") or 0) for r in rows)
