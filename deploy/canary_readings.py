"""What a canary reads while it runs: the door's live state through HAProxy's admin socket (the `canary`
table of top-1 labels, the counters of each side's loopback frontend, the candidate's requests in flight), its
access log (the server's time of each 200 answer), and Prometheus (each side's answers by code class,
TorchServe's requests per version). deploy/canary.py drives the split and judges with these; nothing here
changes the door."""

import os
import re
import socket
import time

import requests

from deploy.frontdoor import FrontDoor

SIDES = ("default", "candidate")
ADMIN_LIMIT = 1 << 22  # bytes read back from one admin command (the table: 16k keys, ~150 bytes a line)
GONE = "!404"  # `server!404` counts a server's 404s (its version gone), `server/label` its 200 answers
TABLE_WORD = re.compile(r"(?:\\.|[^ \\])+")  # a `show table` field: a space inside one is escaped
TABLE_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|.)")


class CanaryError(RuntimeError):
    """A canary that cannot start or go on; its message says why (library code: the CLI prints it)."""


def admin(door: FrontDoor, command: str) -> str:
    """One command on HAProxy's admin socket (the door's 0700 folder); its answer."""
    if "\n" in command or ";" in command:
        raise CanaryError(f"not one admin command: {command!r}")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(door.path("admin.sock"))
        s.sendall(command.encode() + b"\n")
        out = b""
        while len(out) < ADMIN_LIMIT:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def answers(door: FrontDoor, clear: bool = False) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """({server: {top-1 label: 200 answers}}, {server: 404 answers}) from the door's `canary` table (keys
    `server/label"` and `server!404`)."""
    counts: dict[str, dict[str, int]] = {side: {} for side in SIDES}
    gone = dict.fromkeys(SIDES, 0)
    for line in admin(door, "show table canary").splitlines():
        fields = table_fields(line)
        key, n = fields.get("key", ""), fields.get("gpc0", "")
        server, _, label = key.partition("/")
        if not n.isdigit():
            continue
        if key in (f"{side}{GONE}" for side in SIDES):
            gone[key.removesuffix(GONE)] += int(n)
        elif server in counts:
            label = label.rstrip('"')
            counts[server][label] = counts[server].get(label, 0) + int(n)
    if clear:
        admin(door, "clear table canary")
    return counts, gone


def table_fields(line: str) -> dict[str, str]:
    """`0x55..: key=candidate/sea\\ lion use=0 exp=0 gpc0=3` as {"key": "candidate/sea lion", "gpc0": "3"}:
    HAProxy escapes a space, `=` and `\\` with a backslash and other bytes as \\xHH (measured with 2.6)."""
    fields = {}
    for word in TABLE_WORD.findall(line):
        name, eq, value = word.partition("=")
        if eq:
            raw = TABLE_ESCAPE.sub(lambda m: chr(int(m[1][1:], 16)) if len(m[1]) == 3 else m[1], value)
            fields[name] = raw.encode("latin-1", errors="replace").decode(errors="replace")
    return fields


def stat_rows(door: FrontDoor) -> list[dict[str, str]]:
    """The door's own counters (`show stat`), one {column: value} per frontend, backend and server."""
    lines = admin(door, "show stat").splitlines()
    head = lines[0].lstrip("# ").split(",") if lines else []
    return [dict(zip(head, line.split(","))) for line in lines[1:]]


def door_errors(door: FrontDoor) -> dict[str, dict[str, int]]:
    """{side: {"2xx": n, "4xx": n, "5xx": n}} from the door's counters of each side's loopback frontend: the
    backend's server rows miss a 5xx the door retried on the other side."""
    out = {}
    for row in stat_rows(door):
        side = row.get("pxname", "").removeprefix("canary_")
        if side in SIDES and row.get("svname") == "FRONTEND":
            out[side] = {k: int(row.get(f"hrsp_{k}") or 0) for k in ("2xx", "4xx", "5xx")}
    return out


def drain(door: FrontDoor, timeout: float = 30) -> int:
    """Wait (up to `timeout` s) until no request is at or queued for the candidate's server; those still
    there. TorchServe never answers a request queued for a version it unregisters: the user got a 504."""
    deadline = time.time() + timeout
    while True:
        try:
            rows = [
                r for r in stat_rows(door) if (r.get("pxname"), r.get("svname")) == ("canary", "candidate")
            ]
        except OSError:
            return 0  # a door that is gone holds no request
        busy = sum(int(r.get("scur") or 0) + int(r.get("qcur") or 0) for r in rows)
        if not busy or time.time() > deadline:
            return busy
        time.sleep(0.2)


def latencies(door: FrontDoor, offset: int) -> tuple[dict[str, list[float]], int]:
    """({server: [ms, ...]} of the canary lines the access log gained since `offset`, the new offset): the
    server's response time (`srv_ms`, HAProxy's %Tr) of 200 answers only; %Ta would count a client's slow
    upload and download, and a refusal's time is not the model's."""
    out: dict[str, list[float]] = {side: [] for side in SIDES}
    with open(door.log, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line being written stays for the next window
    for raw in data[:end].decode(errors="replace").splitlines():
        head = raw.split('"', 1)[0]  # the quoted request line is the client's: no field is read from it
        fields = dict(f.split("=", 1) for f in head.split(" ") if "=" in f)
        ok = fields.get("status") == "200" and fields.get("srv_ms", "").isdigit()
        if ok and fields.get("lane") == "canary" and fields.get("server") in out:
            out[fields["server"]].append(float(fields["srv_ms"]))
    return out, offset + end


def log_size(door: FrontDoor) -> int:
    """The door's access log size in bytes (0 before it exists): where the next window starts reading."""
    try:
        return os.path.getsize(door.log)
    except OSError:
        return 0


def query(prometheus: str | None, promql: str, at: float | None = None) -> list[dict] | None:
    """The result vector of an instant query (at `at`, else now); None without Prometheus or an answer."""
    if not prometheus:
        return None
    params = {"query": promql, **({"time": str(at)} if at else {})}
    try:
        resp = requests.get(f"{prometheus}/api/v1/query", params=params, timeout=10)
        return resp.json()["data"]["result"] if resp.status_code == 200 else None
    except (requests.RequestException, ValueError, KeyError):
        return None


def responses(prometheus: str | None, at: float) -> dict[str, dict[str, float]] | None:
    """{side: {code class: count}} at time `at`, from Prometheus (each side's loopback frontend, as
    door_errors()); None without it."""
    out: dict[str, dict[str, float]] = {}
    promql = 'sum by (proxy, code) (haproxy_frontend_http_responses_total{proxy=~"canary_.*"})'
    for r in query(prometheus, promql, at) or []:
        side = r["metric"].get("proxy", "").removeprefix("canary_")
        out.setdefault(side, {})[r["metric"].get("code", "")] = float(r["value"][1])
    return out if set(SIDES) <= set(out) else None


def scraped_at(prometheus: str | None) -> float | None:
    """When Prometheus last scraped each side's counters (the older side's newest sample); None without
    them."""
    promql = 'min(timestamp(haproxy_frontend_http_responses_total{proxy=~"canary_.*"}))'
    result = query(prometheus, promql)
    return float(result[0]["value"][1]) if result else None


def fresh_responses(prometheus: str | None, after: float, limit: float) -> dict[str, dict[str, float]] | None:
    """responses() from a scrape taken after `after`, waiting up to `limit` s for one; None without one.
    An instant query answers with the newest sample, however old: a Prometheus that fell behind a busy
    runner gave a baseline from before the window, and the 5xx of the rollout before counted in it."""
    deadline = time.time() + limit
    while (scraped_at(prometheus) or 0) <= after:
        if not prometheus or time.time() > deadline:
            return None
        time.sleep(0.1)
    return responses(prometheus, time.time())


def served_by_version(prometheus: str | None, model: str) -> dict[str, float]:
    """TorchServe's own count of inference requests per version (ts_inference_requests_total), for the
    report."""
    promql = f'sum by (model_version) (ts_inference_requests_total{{model_name="{model}"}})'
    return {
        r["metric"].get("model_version", "?"): float(r["value"][1]) for r in query(prometheus, promql) or []
    }
