"""The one rule that splits the cores between TorchServe workers and their threads (model_src/cores.py), and
the places that follow it: the archive's model-config.yaml and the handler's thread pools."""

import pytest
import yaml

from bundle import settings
from model_src import cores as cores_module
from model_src.cores import MAX_WORKERS, CoreSplit, split_cores, usable_cores, workers_of


@pytest.mark.parametrize(
    "cores, workers, threads",
    [(1, 1, 1), (2, 2, 1), (3, 3, 1), (4, 4, 1), (5, 5, 1), (6, 3, 2), (8, 4, 2), (12, 4, 3), (16, 4, 4)],
)
def test_the_rule_on_common_core_counts(cores, workers, threads):
    assert split_cores(cores) == CoreSplit(workers, threads)


def test_workers_times_threads_is_the_cores_and_workers_stay_few():
    for cores in range(1, 257):
        split = split_cores(cores)
        assert split.workers * split.threads == cores, cores
        assert split.workers <= MAX_WORKERS or split.threads == 1, (cores, split)  # past 4: one per core
        if cores % MAX_WORKERS == 0:
            assert split.workers == MAX_WORKERS, (cores, split)


@pytest.mark.parametrize(
    "files, cores",
    [
        ({}, 16),  # no cgroup files: the affinity
        ({"cpu.max": "max 100000\n"}, 16),
        ({"cpu.max": "200000 100000\n"}, 2),  # a Kubernetes limit of 2 CPUs on a 16-core node
        ({"cpu.max": "150000 100000\n"}, 2),  # rounded up, as the JVM counts them
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "3200000 100000\n"}, 16),  # a quota above the affinity: the affinity
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 16),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
    ],
)
def test_usable_cores_are_the_affinity_within_the_cgroup_quota(monkeypatch, tmp_path, files, cores):
    monkeypatch.setattr(cores_module.os, "sched_getaffinity", lambda pid: set(range(16)))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert usable_cores(str(tmp_path)) == cores


def test_workers_set_in_the_config_win_over_the_rule():
    assert workers_of({}, 16) == 4
    assert workers_of({"maxWorkers": 2, "minWorkers": 2}, 16) == 2
    assert workers_of({"minWorkers": 1}, 16) == 1


@pytest.mark.parametrize("cores, workers", [(2, 2), (16, 4), (1, 1)])
def test_the_archive_ships_the_rule_s_workers_for_this_machine(monkeypatch, tmp_path, cores, workers):
    import deploy.archive as archive

    monkeypatch.setattr(archive, "usable_cores", lambda: cores)
    out = archive.shipped_config(settings.MODEL_CONFIG, None, str(tmp_path / "a.yaml"))
    shipped = yaml.safe_load(open(out))
    source = yaml.safe_load(open(settings.MODEL_CONFIG))
    assert (shipped["minWorkers"], shipped["maxWorkers"]) == (workers, workers)
    assert {k: v for k, v in shipped.items() if not k.endswith("Workers")} == source  # the rest as written
    assert open(out).read().startswith(open(settings.MODEL_CONFIG).read())  # its comments too


def test_the_archive_keeps_workers_the_config_sets_and_applies_the_batch_size(monkeypatch, tmp_path):
    import deploy.archive as archive

    monkeypatch.setattr(archive, "usable_cores", lambda: 16)
    source = tmp_path / "model-config.yaml"
    source.write_text(yaml.safe_dump({**yaml.safe_load(open(settings.MODEL_CONFIG)), "minWorkers": 1}))
    shipped = yaml.safe_load(open(archive.shipped_config(str(source), 8, str(tmp_path / "a.yaml"))))
    assert (shipped["minWorkers"], shipped["maxWorkers"], shipped["batchSize"]) == (1, 1, 8)
    source.write_text(yaml.safe_dump({**yaml.safe_load(source.read_text()), "maxWorkers": 1}))
    assert archive.shipped_config(str(source), None, str(tmp_path / "b.yaml")) == str(source)  # as it is


@pytest.mark.parametrize(
    "cores, config, threads", [(2, {}, 1), (16, {}, 4), (16, {"maxWorkers": 2}, 8), (2, {"maxWorkers": 4}, 1)]
)
def test_each_worker_s_threads_are_its_share_of_the_cores(monkeypatch, cores, config, threads):
    import handlers.image_classifier as handler

    monkeypatch.setattr(handler, "usable_cores", lambda: cores)
    assert handler.ImageClassifier.auto_threads(config) == threads
