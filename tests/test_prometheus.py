"""A real Prometheus scrapes a real TorchServe: the handler's latency histograms give a p99 with PromQL."""

import math
import os
import shutil
import signal
import subprocess
import time

import pytest
import requests

from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.torchserve]

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
# TorchServe 0.12's histograms have the Prometheus Java client's default buckets; the largest finite one is 10 s.
LARGEST_BUCKET = 10.0
P99 = 'histogram_quantile(0.99, sum by (le) (rate(HandlerTime_seconds_bucket{ModelName="my_model"}[1m])))'

if not os.path.exists(PROMETHEUS) and not os.environ.get("CI"):  # in CI scripts/setup.sh installs it: fail there
    pytest.skip("no prometheus: run scripts/setup.sh as root, or apt-get install prometheus", allow_module_level=True)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """A Prometheus on a free port scraping `server`'s metrics port every second (no token: 0.12's metrics
    API has none); its base URL. Stopped, with its whole process group, whatever happened."""
    if not os.path.exists(PROMETHEUS):
        pytest.fail("CI without prometheus: scripts/setup.sh installs it with apt-get (as root)")
    tmp = tmp_path_factory.mktemp("prometheus")
    (tmp / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - {{job_name: torchserve, static_configs: [{{targets: ['127.0.0.1:{server.ports.metrics}']}}]}}\n"
    )
    port = free_port()
    argv = [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}"]
    argv += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with open(tmp / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while not ready(url):
            assert proc.poll() is None, f"prometheus exited:\n{(tmp / 'prometheus.log').read_text()[-2000:]}"
            assert time.time() < deadline, f"prometheus not ready:\n{(tmp / 'prometheus.log').read_text()[-2000:]}"
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
    p99, deadline = math.nan, time.time() + 60
    while not math.isfinite(p99) and time.time() < deadline:
        for _ in range(5):
            resp = server.request("POST", "inference", "/predictions/my_model", data=png)
            assert resp.status_code == 200, resp.text[:200]
        time.sleep(0.5)
        result = query(prometheus, P99)
        p99 = float(result[0]["value"][1]) if result else math.nan
    print(f"p99 of HandlerTime_seconds from Prometheus: {p99:.6f} s")
    assert 0 < p99 <= LARGEST_BUCKET, p99

    (target,) = requests.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert target["health"] == "up" and not target["lastError"], target
    (up,) = query(prometheus, 'up{job="torchserve"}')
    assert up["value"][1] == "1"
