"""A real Prometheus scrapes a real TorchServe: the handler's latency histograms give a p99 with PromQL."""

import contextlib
import math
import os
import signal
import statistics
import subprocess
import time

import pytest
import requests

from tests.conftest import free_port, require_tool

pytestmark = [pytest.mark.slow, pytest.mark.torchserve]

# TorchServe 0.12's histograms have the Prometheus Java client's default buckets (seconds).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


def quantile(q: float) -> str:
    return (
        f'histogram_quantile({q}, sum by (le) (rate(HandlerTime_seconds_bucket{{ModelName="my_model"}}[1m])))'
    )


def bucket_above(seconds: float) -> float:
    """The bound of the histogram bucket that holds an observation of `seconds`."""
    return next((b for b in BUCKETS if b >= seconds), math.inf)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """A Prometheus on a free port scraping `server`'s metrics port every second (no token: 0.12's metrics
    API has none); its base URL. Stopped, with its whole process group, whatever happened."""
    with running_prometheus(
        tmp_path_factory.mktemp("prometheus"), {"torchserve": server.ports.metrics}
    ) as url:
        yield url


@contextlib.contextmanager
def running_prometheus(tmp, targets: dict[str, int]):
    """A real Prometheus on a free port scraping each job's loopback port every second; its base URL.
    Stopped, with its whole process group, whatever happened."""
    binary = require_tool("prometheus")
    jobs = "".join(
        f"  - {{job_name: {job}, static_configs: [{{targets: ['127.0.0.1:{port}']}}]}}\n"
        for job, port in targets.items()
    )
    (tmp / "prometheus.yml").write_text(
        f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n{jobs}"
    )
    port = free_port()
    argv = [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}"]
    argv += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with open(tmp / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while not ready(url):
            assert proc.poll() is None, f"prometheus exited:\n{(tmp / 'prometheus.log').read_text()[-2000:]}"
            assert time.time() < deadline, (
                f"prometheus not ready:\n{(tmp / 'prometheus.log').read_text()[-2000:]}"
            )
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen):
    """SIGTERM to Prometheus's process group (it flushes its TSDB), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def query(url: str, promql: str) -> list:
    resp = requests.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    assert resp.status_code == 200 and resp.json()["status"] == "success", resp.text[:500]
    return resp.json()["data"]["result"]


def test_prometheus_computes_the_handlers_p99_from_torchserves_histogram(server, prometheus, png):
    # rate() needs an increase between two scrapes, so predictions keep coming until the p99 is there.
    # Each handler time is shorter than its request's round trip seen here, so every observation lies in a
    # bucket at or below the one holding the slowest round trip: histogram_quantile() cannot answer above that
    # bucket's bound (a handler reporting milliseconds as seconds would land in +Inf, read as 10 s).
    # The same holds for the median, which one slow round trip on a busy machine cannot loosen.
    p99, deadline, trips = math.nan, time.time() + 60, []
    while not math.isfinite(p99) and time.time() < deadline:
        for _ in range(5):
            t0 = time.perf_counter()
            resp = server.request("POST", "inference", "/predictions/my_model", data=png)
            trips.append(time.perf_counter() - t0)
            assert resp.status_code == 200, resp.text[:200]
        time.sleep(0.5)
        result = query(prometheus, quantile(0.99))
        p99 = float(result[0]["value"][1]) if result else math.nan
    (p50,) = query(prometheus, quantile(0.5))
    p50 = float(p50["value"][1])
    median, slowest = statistics.median_high(trips), max(trips)
    print(
        f"HandlerTime_seconds from Prometheus: p50 {p50:.6f} s, p99 {p99:.6f} s; round trips: "
        f"median {median:.6f} s"
    )
    assert 0 < p99 <= bucket_above(slowest), (p99, slowest)
    assert 0 < p50 <= bucket_above(median), (p50, median)

    (target,) = requests.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert target["health"] == "up" and not target["lastError"], target
    (up,) = query(prometheus, 'up{job="torchserve"}')
    assert up["value"][1] == "1"
