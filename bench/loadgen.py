"""Bounded HTTP load on a local TorchServe: N requests at concurrency C, then latency statistics.

    python -m bench.loadgen --url http://127.0.0.1:8080/predictions/my_model --key-file key_file.json \
        --concurrency 16 --requests 2000 IMAGE [IMAGE ...]

Runs as its own process so that the client's work is not counted inside the server's;
they still share this machine's cores (the report says how many). Only loopback URLs
are accepted: this is a tool for measuring your own server, never someone else's.
"""

import argparse
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import requests

from bundle import settings
from deploy.client import is_loopback, is_probability, read_bytes, top1
from deploy.latency import summary


class LoadgenError(ValueError):
    """run() refuses its target: not a loopback address."""


@dataclass(frozen=True)
class Request:
    """One request of a mix, for bodies that need more than the run's URL and headers: a path after the
    URL (a KServe route), headers of its own on top of the run's, and the answer's form: "v2" (KServe v2,
    with `model` named in it), "v1" (KServe v1) or None (the handler's own label map)."""

    body: bytes
    path: str = ""
    headers: dict = field(default_factory=dict)
    form: str | None = None
    model: str | None = None


REFUSALS = (400, 413, 415)  # how the handler refuses a bad body; a 404 or 429 is no refusal of it


def label_map(body, form: str | None = None, model: str | None = None):
    """The {label: probability} inside an answer of `form`: the handler's own (None), KServe v1's first
    prediction ("v1"), or KServe v2's first `predictions` element, a JSON string, of `model`'s answer ("v2");
    None when the answer is not of that form or holds no label map of numbers."""
    if not isinstance(body, dict):
        return None
    if form == "v1":
        body = (
            body["predictions"][0]
            if isinstance(body.get("predictions"), list) and body["predictions"]
            else None
        )
    elif form == "v2":
        body = v2_predictions(body, model)
    elif "predictions" in body or "outputs" in body:  # a KServe answer where the handler's own was due
        return None
    numbers = isinstance(body, dict) and body and all(is_probability(p) for p in body.values())
    return body if numbers else None


def v2_predictions(body: dict, model: str | None):
    """The first element of a v2 answer's `predictions` output, parsed; None when there is none."""
    outputs = body.get("outputs")
    if body.get("model_name") != model or not isinstance(outputs, list) or not outputs:
        return None
    out = outputs[0]
    if not isinstance(out, dict) or out.get("name") != "predictions" or not out.get("data"):
        return None
    try:
        return json.loads(out["data"][0])
    except (TypeError, ValueError):
        return None


def check(resp, expected, form: str | None = None, model: str | None = None) -> bool:
    """Whether an answer is right. expected: the top-1 label, or None for a bad body, which must be refused
    (REFUSALS) with a JSON message. form, model: the answer's form (label_map). A 5xx is not judged here
    (run() counts it under errors); an answer that does not parse as the expected JSON is wrong, never
    right."""
    body = parsed(resp)
    if expected is None:
        return resp.status_code in REFUSALS and isinstance(body, dict) and "message" in body
    if resp.status_code >= 500:
        return True
    answer = label_map(body, form, model)
    return resp.status_code == 200 and answer is not None and top1(answer) == expected


def parsed(resp):
    """The answer's JSON, or None when it is not JSON."""
    try:
        return resp.json()
    except ValueError:  # requests' JSONDecodeError is one
        return None


def run(url, bodies, concurrency, total, headers=None, expect=None, timeout=60, duration_cap=300):
    """Send `total` requests (bodies cycled) with `concurrency` threads; returns a summary dict.

    bodies: bytes, or Request for a body with its own path and headers.
    expect: optional list, parallel to bodies: the top-1 label each body should get, or None for a
    body that must be refused with a 4xx. Answers that break this count as `wrong`.
    """
    host = urlparse(url).hostname
    if not is_loopback(host):
        raise LoadgenError(f"loadgen: refusing non-loopback target {host}")
    counter = itertools.count()
    lock = threading.Lock()
    latencies, statuses, wrong, first_error = [], {}, 0, []
    local = threading.local()
    deadline = time.time() + duration_cap

    def worker():
        nonlocal wrong
        session = local.__dict__.setdefault("s", requests.Session())
        while time.time() < deadline:
            i = next(counter)
            if i >= total:
                return
            req = bodies[i % len(bodies)]
            req = req if isinstance(req, Request) else Request(req)
            t0 = time.perf_counter()
            try:
                resp = session.post(
                    url + req.path, data=req.body, headers={**(headers or {}), **req.headers}, timeout=timeout
                )
            except requests.RequestException:  # no answer to judge: counted under errors
                code, ok_label = "error", True
            else:
                code = resp.status_code
                if code >= 500 and not first_error:
                    first_error.append(resp.text[:300])
                ok_label = expect is None or check(resp, expect[i % len(bodies)], req.form, req.model)
            dt = (time.perf_counter() - t0) * 1000
            with lock:
                latencies.append(dt)
                statuses[str(code)] = statuses.get(str(code), 0) + 1
                wrong += not ok_label

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    elapsed = time.perf_counter() - start
    done = len(latencies)
    return {
        "concurrency": concurrency,
        "requests": done,
        "seconds": round(elapsed, 3),
        "throughput_rps": round(done / elapsed, 2) if elapsed else None,
        **summary(latencies),
        "statuses": statuses,
        "errors": sum(n for c, n in statuses.items() if c == "error" or c.startswith("5")),
        "wrong_labels": wrong,
        "first_error": first_error[0] if first_error else None,
        "client_cores_shared_with_server": os.cpu_count(),
    }


def spawn(url: str, key_file: str, concurrency: int, requests: int, images: list[str], expect=None):
    """This load generator in its own process (so that its work is not counted inside the caller's);
    read its summary with json.loads(proc.communicate()[0])."""
    cmd = [sys.executable, "-m", "bench.loadgen", "--url", url, "--key-file", key_file]
    cmd += ["--concurrency", str(concurrency), "--requests", str(requests)]
    cmd += [*(["--expect", json.dumps(expect)] if expect else []), *images]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=settings.ROOT)


def main(argv=None):
    """The command line: load --url with the images, print run()'s summary as JSON; exit 1 with the reason
    when run() refuses the target."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+")
    p.add_argument("--url", required=True)
    p.add_argument("--key-file", default=None, help="TorchServe key_file.json (inference key)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--expect", default=None, help="JSON list of expected top-1 labels, parallel to images")
    args = p.parse_args(argv)
    headers = {"Content-Type": "application/octet-stream"}
    if args.key_file:
        with open(args.key_file) as f:
            headers["Authorization"] = f"Bearer {json.load(f)['inference']['key']}"
    bodies = [read_bytes(path) for path in args.images]
    expect = json.loads(args.expect) if args.expect else None
    try:
        result = run(args.url, bodies, args.concurrency, args.requests, headers, expect)
    except LoadgenError as e:
        raise SystemExit(str(e)) from None
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
