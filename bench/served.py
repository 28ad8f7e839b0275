"""A benchmark TorchServe under wrk: one version at a time, the CPU each process spent, the answers checked;
registration and cold-start times (bench/bench.py's served rows)."""

import os
import time

from bench.inprocess import steal_seconds, unstolen
from bench.wrk import children_cpu, cpu_seconds, post_files
from bundle import settings
from deploy import management
from deploy.client import post, read_bytes, top1
from deploy.server import TorchServe

MODEL = settings.MODEL_NAME


class Server:
    """A benchmark TorchServe: wrk against one version at a time, with the CPU each process spent."""

    def __init__(self, ts: TorchServe, seconds: float):
        self.ts, self.seconds = ts, seconds

    def settle(self, timeout: float = 120):
        """Wait until TorchServe is idle. wrk stops sending at the end of a run, but what was queued is still
        served (a slow backend at c=64 leaves seconds of work), on the cores the next measurement needs."""
        frontend = self.ts.pid()
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            before = cpu_seconds([frontend])
            time.sleep(0.5)
            if cpu_seconds([frontend]) - before < 0.05:  # under 5 % of one core
                return

    def load(self, version: str, files: list[str], c: int, content_type=None) -> dict:
        """wrk against `version` at concurrency `c` once TorchServe is idle: its result, plus CPU ms per
        request of each party, the steal share and the throughput the stolen time would have left."""
        self.settle()
        cpu0 = self.cpu()
        url = f"{self.ts.url()}/predictions/{MODEL}/{version}"
        res = post_files(url, self.ts.keys()["inference"]["key"], files, c, self.seconds, content_type)
        cpu1 = self.cpu()
        n = max(res["requests"], 1)
        # CPU ms per request of each party; a worker that died mid-run would make these wrong, and is an
        # error. steal: what the hypervisor gave to other guests while this VM wanted its cores (this VM's
        # drift).
        parties = ("frontend", "workers", "wrk", "steal")
        res["cpu_ms"] = {k: round((b - a) * 1000 / n, 4) for k, a, b in zip(parties, cpu0, cpu1)}
        core_seconds = (os.cpu_count() or 1) * res["seconds"]
        res["cpu_ms"]["idle"] = round(max(0.0, core_seconds * 1000 / n - sum(res["cpu_ms"].values())), 4)
        res["steal_share"] = round((cpu1[3] - cpu0[3]) / core_seconds, 4)
        res["rps_unstolen"] = round(unstolen(res["throughput_rps"], res["steal_share"]), 1)
        return res

    def cpu(self) -> tuple[float, float, float, float]:
        """CPU seconds so far of the frontend alone, of its workers (those alive now), of finished wrk runs,
        and the machine's steal time."""
        import psutil

        frontend = self.ts.pid()
        workers = [p.pid for p in psutil.Process(frontend).children(recursive=True)]
        return (
            cpu_seconds([frontend]) - cpu_seconds(workers),
            cpu_seconds(workers),
            children_cpu(),
            steal_seconds(),
        )

    def check(self, version: str, files: list[str], expect: list[str]) -> dict:
        """Every image once, sequentially, with the Python client: answers read and compared."""
        wrong = errors = 0
        for path, label in zip(files, expect):
            resp = post(self.ts, read_bytes(path), MODEL, version)
            errors += resp.status_code != 200
            wrong += resp.status_code == 200 and top1(resp.json()) != label
        return {"requests": len(files), "wrong_labels": wrong, "errors": errors}


def register(ts: TorchServe, archive: str) -> float:
    """Register the archive (by its file name in the model store); returns the seconds it took."""
    t0 = time.perf_counter()
    management.register(ts, os.path.basename(archive))
    return time.perf_counter() - t0


def cold_start(ts: TorchServe, image: str, timeout: float = 120) -> float:
    """torchserve --start (our start() returns only when workers are READY) to the first 200."""
    t0 = time.perf_counter()
    ts.start(models=f"{MODEL}={MODEL}.mar", restore=False)
    body = read_bytes(image)
    while post(ts, body).status_code != 200:
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"no good answer {timeout:.0f} s after the start; see {ts.log_dir}")
        time.sleep(0.05)
    return time.perf_counter() - t0


def write_busy(path: str, us_per_image: float):
    """What the ideal handler spends per image from now on (it re-reads the file when it changes)."""
    with open(path, "w") as f:
        f.write(f"{us_per_image:.1f}")
