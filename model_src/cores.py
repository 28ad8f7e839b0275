"""How the cores are split between TorchServe workers and each worker's threads: the one rule, so that no
worker count or thread pool is typed by hand.

The rule: workers x threads per worker = cores. Workers come first (single-threaded workers beat one
multi-threaded worker on 2 cores under load: docs/serving.md, "Batching and workers"), up to MAX_WORKERS;
past that, each worker gets more threads. The workers are the largest divisor of the cores up to MAX_WORKERS,
so that no core is left idle: 1 -> 1 x 1, 2 -> 2 x 1, 4 -> 4 x 1, 6 -> 3 x 2, 8 -> 4 x 2, 16 -> 4 x 4; a
prime number of cores above MAX_WORKERS gets one single-threaded worker per core (5 -> 5 x 1).
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

# Four workers with a batch of 4 (model-config.yaml's batchSize) hold the 16 requests of the benchmark's c=16
# in flight; more workers would mostly run half-empty batches, each holding its own copy of the model
# (a worker's resident memory is ~0.6 GB, docs/serving.md).
MAX_WORKERS = 4


@dataclass(frozen=True)
class CoreSplit:
    """TorchServe workers and the threads each worker's runtime (torch, ONNX Runtime, OpenVINO) gets."""

    workers: int
    threads: int


def usable_cores(cgroup: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use, not the host's: its CPU affinity (taskset, cpusets), or fewer where its
    cgroup's CPU quota (a Kubernetes CPU limit) allows less, rounded up as the JVM counts them."""
    cores = len(os.sched_getaffinity(0))
    quota = cpu_quota(cgroup)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def cpu_quota(cgroup: str) -> float | None:
    """The CPU quota, in cores, of the cgroup mounted at `cgroup` (v2's cpu.max, else v1's cfs files); None
    without one."""
    for files in (("cpu.max",), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            values = " ".join(Path(cgroup, name).read_text() for name in files).split()
        except OSError:
            continue
        if len(values) == 2 and all(v.isdigit() for v in values) and int(values[1]):  # "max" or -1: no quota
            return int(values[0]) / int(values[1])
        return None
    return None


def split_cores(cores: int) -> CoreSplit:
    """The rule: the largest number of workers up to MAX_WORKERS that divides `cores`, the rest as threads,
    so that workers x threads = cores (one worker per core when only 1 divides)."""
    cores = max(1, cores)
    workers = max(n for n in range(1, min(cores, MAX_WORKERS) + 1) if cores % n == 0)
    if workers == 1:  # 1 core, or a prime number of them past MAX_WORKERS
        workers = cores
    return CoreSplit(workers, cores // workers)


def threads_per_worker(workers: int, cores: int) -> int:
    """Threads for each of `workers` workers (as model-config.yaml may fix them) sharing `cores`: the cores
    split between them, at least one, so they do not oversubscribe each other."""
    return max(1, cores // max(1, workers))


def workers_of(model_config: dict, cores: int) -> int:
    """The workers a model-config.yaml gives: its maxWorkers (or minWorkers) when set, else the rule's for
    `cores`."""
    return int(model_config.get("maxWorkers") or model_config.get("minWorkers") or split_cores(cores).workers)
