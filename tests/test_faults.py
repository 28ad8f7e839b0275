"""Deployment state under faults (issue 29), against one real TorchServe 0.12: operators killed or hung up on
at chosen points, a lost answer, a full disk under the journal, two operators at once, the default's workers
killed during a gate, and restarts with an unfinished registration and a damaged archive.

The tests run in file order on one server (conftest's `server`: my_model 1.0), each leaving a known state:

    promotion killed before its record; rollback     1.0 (default), 2.0
    the answer to set-default lost; rollback         1.0 (default), 2.0
    SIGHUP during a gate                             1.0 (default), 2.0
    registration of 3.0 killed                       1.0 (default), 2.0, 3.0 (stray)
    restart: 3.0 withdrawn; rollback twice           1.0 (default), 2.0
    full disk under state/ during a promotion        1.0 (default), 2.0
    rollback during a promotion of 3.0               1.0 (default), 2.0, 3.0
    rollback during a gate that rejects 3.0          2.0 (default), 1.0
    two promotions at once (4.0, 5.0)                the second (default), 1.0, 2.0, 4.0, 5.0
    the default's workers killed during a gate       the same (6.0: a dry run)
    restart with the default's archive damaged       start exits 1 naming it; repaired: all back
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile

import pytest
import requests

from deploy import gate as gatelib
from deploy import management, register_version, serve, versions
from deploy.archive import write_checksum
from tests.conftest import ROOT, cannot_run

# in_order: the tests share one module-scoped server (or door) and build on each other's effects
pytestmark = [pytest.mark.slow, pytest.mark.torchserve, pytest.mark.in_order]


def relabel(src, dst, version, rewrite=None):
    """A copy of an archive that says it is `version` (its manifest rewritten), with its .sha256: a new
    version in a second, not a new build. `rewrite(name, data) -> data` may change its other members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = version
                data = json.dumps(manifest).encode()
            elif rewrite:
                data = rewrite(item.filename, data)
            zout.writestr(item, data)
    write_checksum(dst)
    return dst


@pytest.fixture(scope="module")
def archives(store):
    """Versions 2.0 to 6.0 of my_model in the server's store (the 1.0 build, relabelled)."""
    versions = ("2.0", "3.0", "4.0", "5.0", "6.0")
    src = os.path.join(store, "my_model.mar")
    return {v: relabel(src, os.path.join(store, f"my_model_v{v}.mar"), v) for v in versions}


@pytest.fixture(scope="module")
def golden(trained, tmp_path_factory):
    """Two golden images per class (20): every gate here scores it twice."""
    src, dst = os.path.join(trained, "golden"), tmp_path_factory.mktemp("golden")
    with open(os.path.join(src, "golden.json")) as f:
        entries = json.load(f)
    kept = [e for e in entries if sum(x["label"] == e["label"] for x in entries[: entries.index(e)]) < 2]
    for e in kept:
        shutil.copyfile(os.path.join(src, e["file"]), dst / e["file"])
    (dst / "golden.json").write_text(json.dumps(kept))
    return str(dst)


def registered(ts):
    return {v["modelVersion"] for v in management.versions(ts, "my_model")}


def default(ts):
    return management.default_version(ts, "my_model")


# An operator in its own process, against this module's server. FAULT patches one step, the same way on the
# old code and the new, so that the test shows what each does after the fault.
OPERATOR = """
import json, os, signal, sys
from deploy import gate, management, register_version
from deploy.server import Ports, TorchServe
spec = json.loads(os.environ["OPERATOR_SERVER"])
ts = TorchServe(workdir=spec["workdir"], model_store=spec["store"], ports=Ports(*spec["ports"]), user=None)
register_version.TorchServe = lambda: ts
FAULT
sys.exit(register_version.main(sys.argv[1:]))
"""

KILL_AFTER_SET_DEFAULT = """
real = management.set_default
def set_default(*a):
    real(*a)
    os.kill(os.getpid(), signal.SIGKILL)  # TorchServe applied it; the operator never records it
management.set_default = set_default
"""

HANG_UP_DURING_THE_GATE = """
real = gate.score
def score(*a):
    os.kill(os.getpid(), signal.SIGHUP)  # the SSH session dropped while the golden set is scored
    return real(*a)
gate.score = score
"""

KILL_BEFORE_READY = """
def wait_ready(*a, **kw):
    os.kill(os.getpid(), signal.SIGKILL)  # registered, its worker not READY yet
management.wait_ready = wait_ready
"""


def operator(ts, fault, *argv):
    spec = {"workdir": ts.workdir, "store": ts.model_store, "ports": list(vars(ts.ports).values())}
    env = {**os.environ, "OPERATOR_SERVER": json.dumps(spec)}
    code = OPERATOR.replace("FAULT", fault)
    return subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_promotion_killed_before_its_record_can_still_be_rolled_back(server, archives, golden):
    # item 2: TorchServe served the new default, the history had no record, rollback said "no earlier default"
    out = operator(
        server, KILL_AFTER_SET_DEFAULT, "register", archives["2.0"], "--promote", "--golden", golden
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    assert default(server) == "2.0" and registered(server) == {"1.0", "2.0"}
    assert versions.rollback(server, "my_model") == ("2.0", "1.0")
    assert default(server) == "1.0"


def test_a_lost_answer_to_set_default_is_read_back_and_reported(server, archives, monkeypatch, caplog):
    # item 3: the guard killed after TorchServe applied set-default but before it answered
    real = management.set_default

    def lost(*args):
        real(*args)
        raise requests.ConnectionError("Connection aborted: RemoteDisconnected")

    monkeypatch.setattr(management, "set_default", lost)
    assert versions.set_default(server, "my_model", "2.0", reason="test") == "1.0"  # raised ConnectionError
    assert "the answer was lost (Connection aborted" in caplog.text
    monkeypatch.undo()
    assert versions.history(server)[-1]["version"] == "2.0"
    assert versions.rollback(server, "my_model") == ("2.0", "1.0")


def test_sighup_during_a_gate_withdraws_the_candidate(server, archives, golden):
    # item 12: a dropped SSH session exited 129 without cleanup: the candidate stayed registered
    out = operator(
        server, HANG_UP_DURING_THE_GATE, "register", archives["3.0"], "--promote", "--golden", golden
    )
    assert out.returncode == 128 + signal.SIGHUP, out.stderr
    assert "my_model 3.0 unregistered again" in out.stderr
    assert registered(server) == {"1.0", "2.0"} and default(server) == "1.0"


def test_a_registration_killed_midway_is_withdrawn_by_a_retry(server, archives):
    # item 10: a retry said "already registered; archive a new version instead"
    out = operator(server, KILL_BEFORE_READY, "register", archives["3.0"])
    assert out.returncode == -signal.SIGKILL, out.stderr
    # TorchServe has it; the journal says it never finished
    assert registered(server) == {
        "1.0",
        "2.0",
        "3.0",
    }
    assert versions.register(server, archives["3.0"]) == ("my_model", "3.0")
    versions.unregister(server, "my_model", "3.0")
    out = operator(server, KILL_BEFORE_READY, "register", archives["3.0"])  # again, for the restart below
    assert out.returncode == -signal.SIGKILL and registered(server) == {"1.0", "2.0", "3.0"}


def test_a_restart_withdraws_unfinished_registrations_and_keeps_rollback_working(server, caplog):
    # item 11: TorchServe snapshots a version when it is registered, so the next start brought it back
    server.stop()
    info = server.start()
    assert registered(server) == {"1.0", "2.0"} and default(server) == "1.0"
    assert versions.check_restore(server, info["plan"]) == []
    assert "my_model 3.0 withdrawn: its register never finished" in caplog.text
    # item 3, after the restart: rollback and unregister keep working
    assert versions.rollback(server, "my_model") == ("1.0", "2.0")
    assert versions.rollback(server, "my_model") == ("2.0", "1.0")


def test_a_full_disk_under_the_state_folder_stops_a_promotion_before_it_applies(server, tmp_path):
    # item 4: a torn line in deployments.jsonl; every later rollback crashed with a JSONDecodeError
    state = server.path("state")
    saved = tmp_path / "saved"
    shutil.copytree(state, saved)
    # 1 MiB: the state folder holds the model's golden set too (20 files here, a 4 KiB page each on tmpfs)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", state]).returncode:
        cannot_run("needs root to mount a small tmpfs")
    try:
        shutil.copytree(saved, state, dirs_exist_ok=True)
        fd = os.open(os.path.join(state, "filler"), os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError):
                while True:
                    os.write(fd, b"x" * 4096)
        finally:
            os.close(fd)
        with pytest.raises(Exception, match="No space left on device"):
            versions.set_default(server, "my_model", "2.0", reason="x" * 5000)  # longer than what is left
        os.remove(os.path.join(state, "filler"))
        assert default(server) == "1.0"  # refused before it was applied: the journal could not say it
        assert versions.rollback(server, "my_model") == ("1.0", "2.0")
        assert versions.rollback(server, "my_model") == ("2.0", "1.0")
    finally:
        shutil.rmtree(saved)
        shutil.copytree(state, saved)
        subprocess.run(["umount", state], check=True)
        shutil.copytree(saved, state, dirs_exist_ok=True)


def gate_in_thread(server, archive, golden, tmp_path, **kw):
    """Run a promotion in a thread whose scoring waits for `go`; returns (thread, started, go, result)."""
    started, go, result = threading.Event(), threading.Event(), {}
    real = gatelib.score

    def score(*args):
        started.set()
        go.wait(120)
        return real(*args)

    report = str(tmp_path / f"{os.path.basename(archive)}.json")
    args = register_version.get_args_parser().parse_args(
        ["register", archive, "--promote", "--golden", golden, "--report", report]
    )
    for key, value in kw.items():
        setattr(args, key, value)

    def run():
        try:
            result["rc"] = register_version.cmd_register(server, args)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            result["error"] = e

    gatelib.score = score
    t = threading.Thread(target=run)
    t.start()
    assert started.wait(120), result
    return t, go, result, real


def race(gate: threading.Thread, go: threading.Event, operation):
    """Run `operation` in a thread while the gate waits at `go`, let the gate go a second later, wait for
    both."""
    other = threading.Thread(target=operation)
    other.start()
    time.sleep(1)
    go.set()
    gate.join(300)
    other.join(300)


def test_a_rollback_during_a_promotion_is_not_undone(server, archives, golden, tmp_path):
    # item 14: the rollback was undone a second later by the promotion, which reported the wrong previous
    # default
    t, go, promotion, real = gate_in_thread(server, archives["3.0"], golden, tmp_path)
    rolled = {}
    try:
        race(t, go, lambda: rolled.update(r=versions.rollback(server, "my_model")))
    finally:
        gatelib.score = real
    assert promotion == {"rc": 0}
    assert default(server) == rolled["r"][1]  # what the rollback said is what serves
    assert rolled["r"] == ("3.0", "1.0")  # it waited for the promotion, then undid it


def test_a_rollback_during_a_gate_never_picks_the_version_under_the_gate(server, archives, golden, tmp_path):
    # item 15: the rollback chose the version under the gate; the gate rejected it and could not unregister it
    versions.unregister(server, "my_model", "3.0")
    t, go, gate, real = gate_in_thread(server, archives["3.0"], golden, tmp_path, max_accuracy_drop=-1.0)
    rolled = {}

    def rollback():
        try:
            rolled["r"] = versions.rollback(server, "my_model")
        except management.DeployError as e:
            rolled["error"] = str(e)

    try:
        race(t, go, rollback)
    finally:
        gatelib.score = real
    assert gate == {"rc": versions.EXIT_REJECTED}  # the same model cannot gain a point
    assert "3.0" not in registered(server) and default(server) != "3.0"
    assert rolled.get("r", ("", ""))[1] != "3.0", rolled


def test_two_promotions_at_once_take_turns(server, archives, golden, tmp_path):
    # item 13: both printed "is now default" against the same old default; one silently won
    before = default(server)
    results = {}

    def promote(v):
        args = register_version.get_args_parser().parse_args(
            [
                "register",
                archives[v],
                "--promote",
                "--golden",
                golden,
                "--report",
                str(tmp_path / f"{v}.json"),
            ]
        )
        results[v] = register_version.cmd_register(server, args)

    threads = [threading.Thread(target=promote, args=(v,)) for v in ("4.0", "5.0")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == {"4.0": 0, "5.0": 0}
    baselines = {v: json.load(open(tmp_path / f"{v}.json"))["baseline"]["version"] for v in ("4.0", "5.0")}
    first, second = sorted(baselines, key=lambda v: baselines[v] != before)
    assert baselines == {first: before, second: first}  # the second was gated against the first
    assert default(server) == second


def test_the_default_killed_during_a_gate_is_asked_again(server, archives, golden, tmp_path, monkeypatch):
    # item 1: the default's failed requests counted as wrong answers and let a worse candidate through
    baseline, real, sent = default(server), gatelib.post, []

    def post(ts, data, model, version):
        if version == baseline:
            sent.append(1)
            if len(sent) == 5:
                for pid in management.ready_pids(ts, model, version):
                    os.kill(pid, signal.SIGKILL)
        return real(ts, data, model, version)

    monkeypatch.setattr(gatelib, "post", post)
    args = register_version.get_args_parser().parse_args(
        [
            "register",
            archives["6.0"],
            "--dry-run",
            "--golden",
            golden,
            "--report",
            str(tmp_path / "gate.json"),
        ]
    )
    assert register_version.cmd_register(server, args) == 0
    report = json.load(open(tmp_path / "gate.json"))
    assert report["baseline"]["errors"] == 0 and report["baseline"]["retried"] > 0
    assert report["baseline"]["correct"] == report["candidate"]["correct"]  # the same model, asked again
    assert default(server) == baseline and "6.0" not in registered(server)


def test_a_start_that_cannot_restore_the_default_says_so_and_a_repaired_one_restores_it(
    server, store, archives, monkeypatch, caplog
):
    # item 7: the default's archive truncated: "restored the saved deployment", another default, no warning;
    # and after the repair the promoted version was still gone
    want = registered(server), default(server)
    monkeypatch.setattr(serve, "TorchServe", lambda **kw: server)
    mar = archives[want[1]]
    shutil.copyfile(mar, mar + ".good")
    server.stop()
    with open(mar, "r+b") as f:
        f.truncate(os.path.getsize(mar) // 2)
    try:
        with pytest.raises(SystemExit) as exit:
            serve.main(["start"])
        assert f"my_model {want[1]} not served" in str(exit.value) and "--accept-loss" in str(exit.value)
        assert f"my_model {want[1]}: my_model_v{want[1]}.mar: SHA-256" in caplog.text
        assert registered(server) == want[0] - {want[1]} and server.is_running()  # the others serve on
    finally:
        os.replace(mar + ".good", mar)
    server.stop()
    serve.main(["start"])  # no SystemExit
    assert (registered(server), default(server)) == want
