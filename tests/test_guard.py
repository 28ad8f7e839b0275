"""The management guard against a real TorchServe: a differential test. Hundreds of generated query strings
and framings go raw over a socket to the guard; afterwards every registration that TorchServe received (its
access log) must be one the guard approved (its log) and name only an archive of the model store."""

import os
import random
import re

import pytest

from deploy import management
from deploy.guard_request import ARCHIVE_NAME, REGISTRATION, netty_params
from tests.test_guard_units import send_raw

# in_order: the tests share one module-scoped server (or door) and build on each other's effects
pytestmark = [pytest.mark.slow, pytest.mark.torchserve, pytest.mark.in_order]

ABSENT = "/nonexistent/evil"  # TorchServe answers 404 "Model not found at: /nonexistent/evil": it received it
PATHS = ["/models"] * 6 + [
    "//models",
    "/%6Dodels",
    "/models/",
    "/models/.",
    "http://127.0.0.1/models",
    "/workflows",
]
VALID = {
    "synchronous": ["true", "TRUE"],
    "initial_workers": ["0", "1"],
    "model_name": ["my_model", "my%5Fmodel"],
}
HOSTILE = [  # a parameter a key holder might add to a valid registration
    "url=" + ABSENT,
    "url=evil.mar",
    "URL=" + ABSENT,
    "u%72l=" + ABSENT,
    "=url=" + ABSENT,
    "url",
    "url=",
    "model_name=../x",
    "model_name=my+model",
    "initial_workers=x",
    "initial_workers=-1",
    "initial_workers=99999",
    "synchronous=yes",
    "handler=/nonexistent/handler.py",
    "x=1",
    "=1",
    "&",
    "url=my_model.mar%3Burl=" + ABSENT,
    "url=my_model.mar%26url=" + ABSENT,
]
SEPARATORS = ["&"] * 4 + [";"] * 2 + ["&&", ";&", "&="]
FIXED = [  # the review's reproductions, first
    "/models?x=1;url=/nonexistent/evil&url=my_model.mar",
    "/models?url=my_model.mar;url=/nonexistent/evil",
    "/models?url=/nonexistent/evil&url=my_model.mar",
    "/models?=url=/nonexistent/evil",
]


def query(rng) -> str:
    """A valid registration's parameters in any order and separators, half of the time with hostile
    additions."""
    params = [f"url={rng.choice(['my_model.mar', 'my%5Fmodel.mar'])}"]
    params += [f"{k}={rng.choice(v)}" for k, v in VALID.items() if rng.random() < 0.4]
    if rng.random() < 0.5:
        params += rng.sample(HOSTILE, rng.randint(1, 2))
    rng.shuffle(params)
    out = params[0]
    for p in params[1:]:
        out += rng.choice(SEPARATORS) + p
    return out


def framing(rng, key: str, method: str, target: str) -> bytes:
    """One raw request: mostly well framed, else a duplicate Content-Length, CL+TE, a bad CL, a control
    character, a bare LF... each carrying a second request in its body, as a smuggler would."""
    auth = rng.choice([f"Authorization: Bearer {key}"] * 8 + ["", "Authorization: Bearer wrong"])
    smuggled = f"POST /models?url={ABSENT}/smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    n = len(smuggled)
    extra = rng.choice(
        [""] * 24
        + [
            f"Content-Length: {n}\r\nContent-Length: 0\r\n",
            f"Content-Length: 0\r\nContent-Length: {n}\r\n",
            f"Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: abc\r\n",
            f"Content-Length: {n}\r\n X-Folded: yes\r\n",
            "X-Bad: a\x01b\r\n",
            f"content-length: {n}\r\nCONTENT-LENGTH: 0\r\n",
            f"Content-Length: {n}\r\n",
        ]
    )
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + (
        auth + "\r\n" if auth else ""
    )
    eol = "\n" if rng.random() < 0.03 else "\r\n"
    body = smuggled if f"Content-Length: {n}" in extra or "chunked" in extra else ""
    return (head + extra + "\r\n").replace("\r\n", eol).encode() + body.encode()


def send(port: int, raw: bytes) -> bytes:
    return send_raw(port, raw, timeout=60)


def received(ts) -> list[str]:
    """Request targets of the registrations in TorchServe's access log."""
    with open(os.path.join(ts.log_dir, "access_log.log"), errors="replace") as f:
        return re.findall(r'"POST (\S*models\S*) HTTP/1\.[01]"', f.read())


def approved(ts) -> set[str]:
    """Registrations the guard re-issued, from its log."""
    with open(os.path.join(ts.log_dir, "guard.log"), errors="replace") as f:
        return set(re.findall(r" -> POST (/models\S*) \d{3} ", f.read()))


def test_every_registration_torchserve_receives_is_one_the_guard_approved(server):
    rng = random.Random(25)
    key = server.keys()["management"]["key"]
    targets = FIXED + [rng.choice(PATHS) + "?" + query(rng) for _ in range(300)]
    answers = {}
    for target in targets:
        raw = framing(rng, key, rng.choice(["POST"] * 8 + ["PUT", "GET"]), target)
        status = send(server.ports.management, raw)[9:12].decode()
        answers[status] = answers.get(status, 0) + 1
    seen, ok = received(server), approved(server)
    print(f"{len(targets)} requests, answers {answers}; TorchServe received {len(seen)} registrations")
    assert len(seen) >= 10 and len(ok) >= 5  # the positive control: approved calls do reach TorchServe's log
    for target in seen:
        params = netty_params(target.partition("?")[2])  # as TorchServe reads it
        assert target in ok, target  # before: 'POST /models?x=1;url=/nonexistent/evil&url=my_model.mar'
        urls = [v for k, v in params if k == "url"]
        assert len(urls) == 1 and ARCHIVE_NAME.fullmatch(urls[0]), target
        assert {k for k, _ in params} <= set(REGISTRATION), target
    assert set(management.model_names(server)) == {"my_model"}
    assert answers.get("", 0) == 0  # every request got an answer
