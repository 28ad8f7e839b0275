"""The deployment library without a TorchServe: the key handling of requests (against a stand-in API), the
generated config as Java reads it, the pid file's place, the gate's arithmetic and class check, and the
archive builder killed at each step (with a stand-in export)."""

import fcntl
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import psutil
import pytest

from bundle.properties import read_properties, write_properties
from deploy import archive as archivelib
from deploy import gate as gatelib
from deploy import journal, management, register_version, versions
from deploy.archive import check_archive, write_checksum
from deploy.server import Ports, TorchServe
from tests.conftest import ROOT, cannot_run, require_tool

INVALID_KEY = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"


# --- requests and keys, against a stand-in API --------------------------------------------------------------


class Recorder(http.server.HTTPServer):
    """A stand-in API on one port: refuses key 'old' like TorchServe does, /token switches the key file to
    'new'."""

    def __init__(self, key_file):
        super().__init__(("127.0.0.1", 0), RecorderHandler)
        self.key_file, self.seen, self.accept = key_file, [], "new"


class RecorderHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.server.seen.append((self.path, dict(self.headers)))
        if self.path.startswith("/token"):
            keys = {k: {"key": "new"} for k in ("inference", "management")}
            with open(self.server.key_file, "w") as f:
                json.dump({**keys, "API": {"key": "api"}}, f)
            body, code = b"", 200
        elif self.headers.get("Authorization") == f"Bearer {self.server.accept}":
            body, code = b"{}", 200
        else:
            body, code = (
                json.dumps({"code": 400, "type": "InvalidKeyException", "message": INVALID_KEY}).encode(),
                400,
            )
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def test_request_retries_after_a_refresh_with_the_callers_headers(tmp_path):
    key_file = tmp_path / "home" / "key_file.json"  # where TorchServe(workdir=tmp_path) reads it
    key_file.parent.mkdir()
    key_file.write_text(
        json.dumps({"inference": {"key": "old"}, "management": {"key": "old"}, "API": {"key": "api"}})
    )
    stub = Recorder(str(key_file))
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        port = stub.server_port
        ts = TorchServe(workdir=str(tmp_path), model_store=str(tmp_path), ports=Ports(port, port, port, 1, 2))
        resp = ts.request(
            "POST", "inference", "/x", data=b"abc", headers={"Content-Type": "image/png", "X-Trace": "7"}
        )
        assert resp.status_code == 200
        paths = [path for path, _ in stub.seen]
        assert paths == ["/x", "/token?type=inference", "/x"]
        first, token, retry = (headers for _, headers in stub.seen)
        assert token["Authorization"] == "Bearer api"
        assert first["Authorization"] == "Bearer old" and retry["Authorization"] == "Bearer new"
        assert retry["Content-Type"] == "image/png" and retry["X-Trace"] == "7"  # not dropped on the retry
    finally:
        stub.shutdown()
        stub.server_close()


def test_keys_are_read_once_and_read_again_when_refused(tmp_path):
    def write_keys(key):
        key_file.write_text(
            json.dumps({"inference": {"key": key}, "management": {"key": key}, "API": {"key": "api"}})
        )

    key_file = tmp_path / "home" / "key_file.json"  # where TorchServe(workdir=tmp_path) reads it
    key_file.parent.mkdir()
    write_keys("k1")
    stub = Recorder(str(key_file))
    stub.accept = "k1"
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        port = stub.server_port
        ts = TorchServe(workdir=str(tmp_path), model_store=str(tmp_path), ports=Ports(port, port, port, 1, 2))
        reads, read_keys = [], ts.read_keys
        ts.read_keys = lambda: reads.append(1) or read_keys()
        assert [ts.request("GET", "inference", "/x").status_code for _ in range(5)] == [200] * 5
        assert len(reads) == 1  # was one read of the key file (and of pid file, process, configs) per request
        stub.accept = "k2"  # the server restarted with new keys
        write_keys("k2")
        assert ts.request("GET", "management", "/x").status_code == 200
        assert len(reads) == 2 and not any(path.startswith("/token") for path, _ in stub.seen)
    finally:
        stub.shutdown()
        stub.server_close()


# --- units without a server: the generated config, the pid file, the gate's arithmetic ----------------------

# what java.util.Properties must get back exactly as config.properties (or an override) meant it
ODD_VALUES = {
    "spaces": "  leading and trailing  ",
    "controls": "tab\there\nnewline\rreturn\fform feed",
    "specials": "a=b:c#d!e \\ f\\",
    "unicode": "café 数字 😀",
    "empty": "",
    "odd key=with:separators #and! spaces": "x",
}


def config_with_odd_values(tmp_path) -> TorchServe:
    base = tmp_path / "config.properties"
    base.write_text(
        "# written the way config.properties documents it\n"
        "allowed_urls=https://models\\\\.example\\\\.com/.*\n"
        "continued=one \\\n    two\n"
    )
    return TorchServe(
        workdir=str(tmp_path / "ts"),
        model_store=str(tmp_path),
        ports=Ports(1, 2, 3, 4, 5),
        base_config=str(base),
        overrides=ODD_VALUES,
    )


def test_the_generated_config_carries_every_value_unchanged(tmp_path):
    ts = config_with_odd_values(tmp_path)
    props = ts.config()
    assert props["allowed_urls"] == r"https://models\.example\.com/.*" and props["continued"] == "one two"
    path, _ = ts.write_config(restore=False)
    assert read_properties(path) == props  # before: every backslash lost one level on the way
    allowed = read_properties(path)["allowed_urls"]
    assert re.fullmatch(allowed, "https://models.example.com/my_model.mar")
    assert not re.fullmatch(allowed, "https://models-example.com/evil.mar")  # the look-alike host


def test_the_frontend_logging_config_is_found_from_the_servers_own_directory(tmp_path):
    # config.properties names serving/log4j2.xml relative to the repository; the JVM runs in the server's
    # workdir.
    props = TorchServe(workdir=str(tmp_path), ports=Ports(1, 2, 3, 4, 5), user=None).config()
    path = props["vmargs"].split("-Dlog4j.configurationFile=", 1)[1]
    assert os.path.isabs(path) and os.path.isfile(path) and path.endswith("serving/log4j2.xml")


JAVA_DUMP = """
import java.io.*;
import java.util.*;

public class Dump {
    public static void main(String[] args) throws Exception {
        Properties p = new Properties();
        try (InputStream in = new FileInputStream(args[0])) { p.load(in); }  // as TorchServe's ConfigManager
        for (String k : p.stringPropertyNames()) System.out.println(hex(k) + " " + hex(p.getProperty(k)));
    }

    static String hex(String s) {  // UTF-16 code units: no quoting or encoding questions on the way back
        StringBuilder b = new StringBuilder("x");
        for (char c : s.toCharArray()) b.append(String.format("%04x", (int) c));
        return b.toString();
    }
}
"""


def test_java_reads_the_generated_config_as_we_do(tmp_path):
    require_tool("java")  # TorchServe's frontend needs it too
    ts = config_with_odd_values(tmp_path)
    path, _ = ts.write_config(restore=False)
    (tmp_path / "Dump.java").write_text(JAVA_DUMP)
    out = subprocess.run(
        ["java", str(tmp_path / "Dump.java"), path], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    decode = lambda h: bytes.fromhex(h[1:]).decode("utf-16-be", "surrogatepass")
    java = dict(tuple(map(decode, line.split())) for line in out.stdout.splitlines())
    assert java == ts.config()


def test_the_pid_file_is_looked_up_in_the_servers_private_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", "/tmp")  # whatever the caller's TMPDIR is, the server's is its own
    # forget the cached folder: gettempdir() reads TMPDIR again
    monkeypatch.setattr(tempfile, "tempdir", None)
    ts = TorchServe(workdir=str(tmp_path), model_store=str(tmp_path), ports=Ports(1, 2, 3, 4, 5), user=None)
    ts.prepare_dirs()
    tmp = tmp_path / "home" / "tmp"
    assert tmp.stat().st_mode & 0o777 == 0o700
    # TorchServe's CLI writes tempfile.gettempdir()/.model_server.pid in the environment start() gives it
    cli = [sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"]
    where = subprocess.run(cli, env=ts.env(), capture_output=True, text=True, check=True).stdout.strip()
    assert ts.pid_file == os.path.join(where, ".model_server.pid") == str(tmp / ".model_server.pid")

    # a stand-in frontend started like start() starts one, with tokens off (`serve.sh start --no-tokens`)
    (tmp_path / "generated.properties").write_text("disable_token_authorization=true\n")
    argv = ["import time; time.sleep(60)", "org.pytorch.serve.ModelServer", "-f", "generated.properties"]
    fake = subprocess.Popen([sys.executable, "-c", *argv], cwd=tmp_path)
    try:
        for _ in range(200):  # until it has exec'd: before that its command line is still pytest's
            if "org.pytorch.serve.ModelServer" in psutil.Process(fake.pid).cmdline():
                break
            time.sleep(0.05)
        (tmp / ".model_server.pid").write_text(str(fake.pid))
        assert ts.pid() == fake.pid and ts.is_running()
        assert ts.tokens_enabled is False and ts.auth("inference") == {}  # the running one's config decides
    finally:
        fake.kill()
        fake.wait()
    ts.forget()  # what stop() does
    assert ts.pid() is None and ts.tokens_enabled is True  # not running: config.properties decides


@pytest.mark.parametrize("baseline", [100, 99, 98, 97, 90])
def test_the_gate_allows_a_drop_of_exactly_max_accuracy_drop(baseline, monkeypatch):
    golden = [(b"", "0")] * 100
    correct = {"default": baseline, "one worse": baseline - 1, "two worse": baseline - 2}

    def score(ts, model, version, golden):  # what gatelib.score reports, without a server
        n = correct[version]
        return {
            "version": version,
            "correct": n,
            "accuracy": n / 100,
            "errors": 0,
            "predictions": ["0"] * n + ["1"] * (100 - n),
        }

    monkeypatch.setattr(gatelib, "score", score)
    monkeypatch.setattr(gatelib, "version_classes", lambda ts, model, version: ["0", "1"])
    one = gatelib.gate(None, "my_model", "one worse", "default", golden, max_drop=1.0)
    assert one["passed"] is True, one["reason"]  # 0.97 - 0.96 is 1.0000000000000009 points in floats
    assert "drop of 1.00 points (within the allowed 1.00)" in one["reason"]
    two = gatelib.gate(None, "my_model", "two worse", "default", golden, max_drop=1.0)
    assert two["passed"] is False and "drop of 2.00 points (over the allowed 1.00)" in two["reason"]
    assert gatelib.accuracy_drop(baseline, baseline - 1, 100, 1.0) == (1.0, True)
    assert gatelib.accuracy_drop(baseline, baseline - 2, 100, 1.0) == (2.0, False)


def test_the_class_check_comes_before_scoring_and_can_be_overridden(monkeypatch):
    classes = {
        "1.0": [str(d) for d in range(10)],
        "2.0": [str(d) for d in reversed(range(10))],
        "3.0": ["a", "0"],
    }
    monkeypatch.setattr(gatelib, "version_classes", lambda ts, model, version: classes[version])
    scored = []

    def score(ts, model, version, golden):
        scored.append(version)
        return {"version": version, "correct": 1, "accuracy": 1.0, "errors": 0, "predictions": ["0"]}

    monkeypatch.setattr(gatelib, "score", score)
    same = gatelib.gate(None, "my_model", "2.0", "1.0", [(b"", "0")], max_drop=1.0)
    # the order of the indices does not matter
    assert same["passed"] is True and same["classes"]["same"] is True
    scored.clear()
    refused = gatelib.gate(None, "my_model", "3.0", "1.0", [(b"", "0")], max_drop=1.0)
    assert refused["passed"] is False and scored == []
    assert "2 classes vs the default's 10; new: a; gone: 1, 2, 3, 4 and 5 more" in refused["reason"]
    allowed = gatelib.gate(None, "my_model", "3.0", "1.0", [(b"", "0")], max_drop=1.0, allow_new_classes=True)
    assert allowed["passed"] is True and scored == ["3.0", "1.0"] and allowed["classes"]["overridden"] is True


@pytest.mark.parametrize(
    ("default", "said"),
    [
        (
            "1.0",
            "photos 1.0 is the first version of photos, and its default",
        ),  # was: "not promoted: ... stays"
        ("0.9", "not promoted: photos 0.9 stays default (/predictions/photos/1.0 serves the new one)"),
    ],
)
def test_register_without_a_gate_says_which_version_is_default(tmp_path, monkeypatch, capsys, default, said):
    """`register_version.sh model_store/photos.mar`, without --promote: TorchServe keeps a model's first
    version default by itself (a stand-in for it here: TorchServe's side is test_deploy.py's)."""
    ts = TorchServe(workdir=str(tmp_path), model_store=str(tmp_path), ports=Ports(1, 2, 3, 4, 5))
    monkeypatch.setattr(register_version, "register", lambda *args, **kwargs: ("photos", "1.0"))
    monkeypatch.setattr(register_version.management, "default_version", lambda ts, model: default)
    args = register_version.get_args_parser().parse_args(["register", str(tmp_path / "photos.mar")])
    assert register_version.cmd_register(ts, args) == 0
    assert capsys.readouterr().out.splitlines() == ["registered photos 1.0 from photos.mar", said]


# --- the archive builder killed at each step (a stand-in export; the real torch-model-archiver) -------------

# Builds version 3.0 into a store with deploy.archive's CLI. KILL_AT: "export" dies (SIGKILL) while exporting,
# "placement-N" right after its N-th rename or link into the store, "sigterm" waits in the export for a
# SIGTERM.
ARCHIVE_DRIVER = """
import os, signal, sys, time, types
from tests.test_tools import fake_export
from deploy import archive
kill_at, store = sys.argv[1], os.path.abspath(sys.argv[2])
export = fake_export()

def export_all(checkpoint, export_dir, formats, optional=frozenset()):
    if kill_at == "export":
        os.kill(os.getpid(), signal.SIGKILL)
    if kill_at == "sigterm":
        open(store + ".exporting", "w").close()
        time.sleep(120)
    return export.export_all(checkpoint, export_dir, formats, optional)

sys.modules["train.export"] = types.SimpleNamespace(export_all=export_all)
placed = 0

def placing(real):
    def call(src, dst, *args, **kwargs):
        global placed
        real(src, dst, *args, **kwargs)
        if os.path.dirname(os.path.abspath(dst)) == store:
            placed += 1
            if kill_at == f"placement-{placed}":
                os.kill(os.getpid(), signal.SIGKILL)
    return call

os.link, os.replace, os.rename = placing(os.link), placing(os.replace), placing(os.rename)
archive.main(archive.get_args_parser().parse_args(
    ["--version", "3.0", "--checkpoint", "unused.pt", "--backend", "eager", "--model-store", store]))
"""
MAR = "my_model_v3.0.mar"


def start_archive(store, kill_at):
    return subprocess.Popen([sys.executable, "-c", ARCHIVE_DRIVER, kill_at, str(store)], cwd=ROOT)


def build_in_process(store, monkeypatch, version="3.0"):
    from tests.test_tools import fake_export

    monkeypatch.setitem(sys.modules, "train.export", fake_export())
    return archivelib.archive_checkpoint("unused.pt", version, "eager", model_store=str(store))


@pytest.mark.parametrize("kill_at", ["export", "placement-1", "placement-2"])
def test_an_archive_killed_at_any_step_leaves_no_mar_without_its_checksum(tmp_path, monkeypatch, kill_at):
    store = tmp_path / "store"
    assert start_archive(store, kill_at).wait(timeout=300) in (-signal.SIGKILL, 0)
    complete = (store / MAR).exists()
    if complete:  # then with its checksum
        archivelib.verify_checksum(str(store / MAR))
    # goes through and clears what was left
    build_in_process(store, monkeypatch, "4.0" if complete else "3.0")
    names = sorted(os.listdir(store))
    assert not [n for n in names if n.startswith(".archive-")], "a staging folder was left"
    assert MAR in names and len(names) == (4 if complete else 2)  # each archive with its sidecar
    for mar in (n for n in names if n.endswith(".mar")):
        archivelib.verify_checksum(str(store / mar))


def test_a_terminated_archive_removes_its_staging_folder(tmp_path):
    store = tmp_path / "store"
    proc = start_archive(store, "sigterm")
    try:
        for _ in range(600):  # until it is exporting (the process's exit ends the wait too)
            if os.path.exists(f"{store}.exporting") or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert [n for n in os.listdir(store) if n.startswith(".archive-")], (
            "no staging folder while exporting"
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert os.listdir(store) == []


def test_a_live_builds_staging_folder_is_kept_a_dead_ones_removed(tmp_path, monkeypatch):
    store = tmp_path / "store"
    live, dead = store / ".archive-live", store / ".archive-dead"
    for folder in (live, dead):
        (folder / "export").mkdir(parents=True)
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a build in progress holds it
        build_in_process(store, monkeypatch)
        assert sorted(os.listdir(store)) == [".archive-live", MAR, MAR + ".sha256"]
    finally:
        os.close(fd)


@pytest.mark.parametrize("text", ["", "\n", "not-a-digest  my_model.mar\n"])
def test_an_empty_or_garbled_sidecar_is_refused_with_a_value_error(tmp_path, text):
    mar = tmp_path / "my_model.mar"
    mar.write_bytes(b"PK")
    (tmp_path / "my_model.mar.sha256").write_text(text)
    with pytest.raises(ValueError, match="is empty or garbled"):
        archivelib.verify_checksum(str(mar))


# --- the deployment state under faults (issue 29): restore plans, the journal, the lock, the gate's retries


def fake_mar(store, name, model="my_model", version="1.0"):
    """A minimal archive the checks accept: a zip with a manifest, and its .sha256."""
    path = os.path.join(store, name)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            "MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": model, "modelVersion": version}})
        )
        z.writestr("weights.bin", os.urandom(64))
    write_checksum(path)
    return path


def write_snapshot(ts, name, models, age):
    """A TorchServe snapshot in logs/config: models = {model: {version: (marName, default)}}; older with
    age."""
    snap = {
        "name": name,
        "modelCount": len(models),
        "models": {
            m: {v: {"defaultVersion": d, "marName": mar, "minWorkers": 1} for v, (mar, d) in vs.items()}
            for m, vs in models.items()
        },
    }
    path = os.path.join(ts.log_dir, "config", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_properties(path, {"model_snapshot": json.dumps(snap)})
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def restored(ts) -> dict:
    """{model: (sorted versions, default)} of the model_snapshot a start would load (read back from the
    config)."""
    path, _ = ts.write_config()
    raw = read_properties(path).get("model_snapshot")
    models = json.loads(raw)["models"] if raw else {}
    return {
        m: (sorted(vs), next(v for v, e in vs.items() if e["defaultVersion"]))
        for m, vs in sorted(models.items())
    }


@pytest.fixture
def offline(tmp_path):
    """A TorchServe that is never started: its workdir, a model store with my_model 1.0 and 2.0."""
    store = tmp_path / "store"
    store.mkdir()
    fake_mar(store, "my_model.mar")
    fake_mar(store, "my_model_v2.0.mar", version="2.0")
    return TorchServe(
        workdir=str(tmp_path / "ts"), model_store=str(store), ports=Ports(1, 2, 3, 4, 5), user=None
    )


def test_restore_skips_unreadable_snapshots_and_names_them(offline, caplog):
    # item 6: a truncated newest snapshot stopped every start with a raw JSONDecodeError naming no file
    write_snapshot(offline, "old.cfg", {"my_model": {"1.0": ("my_model.mar", True)}}, age=60)
    both = {"1.0": ("my_model.mar", False), "2.0": ("my_model_v2.0.mar", True)}
    good = write_snapshot(offline, "new.cfg", {"my_model": both}, age=30)
    with open(good, "rb") as f:
        data = f.read()
    with open(good, "wb") as f:
        f.write(data[: len(data) // 2])
    empty = write_snapshot(offline, "empty.cfg", {}, age=0)
    open(empty, "w").close()  # what a full disk leaves (item 5)
    assert restored(offline) == {"my_model": (["1.0"], "1.0")}  # the newest readable one
    err = caplog.text
    assert (
        f"TorchServe snapshot {good} is unreadable" in err
        and f"TorchServe snapshot {empty} is unreadable" in err
    )


def test_restore_checks_every_archive_and_keeps_the_others(offline, tmp_path, caplog):
    store = offline.model_store
    fake_mar(store, "photos.mar", model="photos")
    fake_mar(store, "oddnames.mar", model="my_model")  # item 7: replaced by another build, sidecar rewritten
    fake_mar(store, "my_model_v3.0.mar", version="3.0")
    with open(os.path.join(store, "my_model_v3.0.mar"), "ab") as f:
        f.write(b"tampered")  # item 8: checksum mismatch
    outside = fake_mar(tmp_path, "evil.mar", version="4.0")  # issue 25 finding 11: an absolute marName
    models = {
        "my_model": {
            "1.0": ("my_model.mar", False),
            "3.0": ("my_model_v3.0.mar", True),
            "4.0": (outside, False),
            "5.0": ("../store/my_model.mar", False),
        },
        "photos": {"1.0": ("photos.mar", True)},
        "oddnames": {"1.0": ("oddnames.mar", True)},
    }
    write_snapshot(offline, "snap.cfg", models, age=0)
    assert restored(offline) == {"my_model": (["1.0"], "1.0"), "photos": (["1.0"], "1.0")}
    err = caplog.text
    assert "my_model 3.0: my_model_v3.0.mar: SHA-256" in err and "does not match" in err
    assert f"my_model 4.0: {outside!r} is not the file name of a .mar in the model store" in err
    assert "my_model 5.0: '../store/my_model.mar' is not the file name" in err
    assert "oddnames 1.0: oddnames.mar holds my_model 1.0, not oddnames 1.0; not restoring it" in err


def test_restore_follows_the_journal_where_snapshots_lost_or_kept_too_much(offline):
    state = offline.path("state")
    # item 5: a full disk under logs/config left only a snapshot from before the promotion of 2.0
    write_snapshot(offline, "before.cfg", {"my_model": {"1.0": ("my_model.mar", True)}}, age=60)
    journal.baseline(state, {"my_model": {"versions": {"1.0": "my_model.mar"}, "default": "1.0"}}, "start")
    reg = journal.begin(state, "register", model="my_model", version="2.0", archive="my_model_v2.0.mar")
    journal.finish(state, reg, default="1.0")
    promote = journal.begin(state, "default", model="my_model", version="2.0", previous="1.0", reason="gate")
    journal.finish(state, promote)
    assert restored(offline) == {"my_model": (["1.0", "2.0"], "2.0")}

    # items 10, 11: killed mid-registration; TorchServe snapshots a version as soon as it is registered
    fake_mar(offline.model_store, "my_model_v3.0.mar", version="3.0")
    journal.begin(state, "register", model="my_model", version="3.0", archive="my_model_v3.0.mar")
    three = {
        "1.0": ("my_model.mar", False),
        "2.0": ("my_model_v2.0.mar", True),
        "3.0": ("my_model_v3.0.mar", False),
    }
    write_snapshot(offline, "after.cfg", {"my_model": three}, age=0)
    assert restored(offline) == {"my_model": (["1.0", "2.0"], "2.0")}  # withdrawn, never served again
    plan = offline.write_config()[1]
    assert [(d["op"], d["version"]) for d in plan["withdrawn"]] == [("register", "3.0")]

    # item 2: killed between set-default and its record: the snapshot says whether it was applied
    journal.begin(state, "default", model="my_model", version="1.0", previous="2.0", reason="rollback")
    two = {"1.0": ("my_model.mar", True), "2.0": ("my_model_v2.0.mar", False)}
    write_snapshot(offline, "after.cfg", {"my_model": two}, age=0)
    assert restored(offline) == {"my_model": (["1.0", "2.0"], "1.0")}
    assert offline.write_config()[1]["expected"]["my_model"]["either"] == ["2.0", "1.0"]


def test_a_torn_journal_line_is_skipped_and_reported(offline, caplog):
    # item 4: a full disk during a promotion tore a line; every later rollback crashed with a JSONDecodeError
    state = offline.path("state")
    os.makedirs(state)
    line = {
        "id": "a1",
        "op": "default",
        "state": "done",
        "model": "my_model",
        "version": "2.0",
        "previous": "1.0",
    }
    with open(os.path.join(state, "deployments.jsonl"), "w") as f:
        f.write(json.dumps(line) + "\n" + json.dumps({**line, "id": "b2", "version": "1.0"})[:40])
    assert [e["version"] for e in versions.history(offline)] == ["2.0"]
    assert "deployments.jsonl line 2 is unreadable" in caplog.text
    journal.append(state, {**line, "id": "c3", "version": "3.0"})  # starts on a line of its own
    assert [e["version"] for e in versions.history(offline)] == ["2.0", "3.0"]


def test_a_full_disk_leaves_no_torn_journal_line(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(state)]).returncode:
        cannot_run("needs root to mount a small tmpfs")
    try:
        journal.baseline(str(state), {"m": {"versions": {"1.0": "m.mar"}, "default": "1.0"}}, "start")
        path = state / "deployments.jsonl"
        size = path.stat().st_size
        fd = os.open(state / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # the disk fills up, to the last byte
            with pytest.raises(OSError):
                for chunk in (4096,) * 100 + (1,) * 5000:
                    os.write(fd, b"x" * chunk)
        finally:
            os.close(fd)
        with pytest.raises(
            journal.JournalError, match="cannot write the deployment journal .*nothing was changed"
        ):
            journal.begin(str(state), "default", model="m", version="2.0", previous="1.0", reason="x" * 8000)
        assert path.stat().st_size == size  # cut back: no torn line
        os.remove(state / "filler")
        journal.begin(str(state), "default", model="m", version="2.0", previous="1.0", reason="ok")
        assert [e["op"] for e in journal.read(str(state))] == ["state", "default"]
    finally:
        subprocess.run(["umount", str(state)], check=True)


def test_an_empty_checksum_file_is_a_clear_refusal(offline):
    path = os.path.join(offline.model_store, "my_model_v2.0.mar")
    open(
        path + ".sha256", "w"
    ).close()  # was: IndexError in register_version, a dropped connection at the guard
    with pytest.raises(ValueError, match=r"my_model_v2.0.mar.sha256 is empty or garbled"):
        check_archive(path, offline.model_store)


def test_the_deployment_lock_makes_a_second_operator_wait(tmp_path, caplog):
    order, inside = [], threading.Event()

    def first():
        with journal.locked(str(tmp_path), "register my_model 2.0"):
            inside.set()
            time.sleep(0.5)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    inside.wait(10)
    with journal.locked(str(tmp_path), "rollback my_model"):
        order.append("second in")
        with journal.locked(str(tmp_path), "nested"):  # re-entrant within one operator
            pass
    t.join()
    assert order == ["first done", "second in"]
    waited = r"waiting for the deployment lock, held by pid \d+: register my_model 2.0"
    assert re.search(waited, caplog.text)


class Answer:
    def __init__(self, status, label="3"):
        self.status_code = status

        self.json = lambda: {label: 0.9, "1": 0.1}


def test_the_gate_retries_failed_requests_and_is_inconclusive_when_the_default_keeps_failing(monkeypatch):
    golden = [(b"%d" % i, "3") for i in range(10)]
    monkeypatch.setattr(gatelib, "RETRY_WAITS", (0, 0), raising=False)  # raising: the old gate had none
    monkeypatch.setattr(gatelib, "version_classes", lambda ts, model, version: ["1", "3"])
    sent = {}

    def post(ts, data, model, version):  # the default's workers die on two images: 503 once, then fine
        sent[version, data] = sent.get((version, data), 0) + 1
        if version == "1.0" and data in (b"4", b"5") and (sent[version, data] == 1 or persistent):
            return Answer(503)
        return Answer(200)

    monkeypatch.setattr(gatelib, "post", post)
    persistent = False
    report = gatelib.gate(None, "my_model", "2.0", "1.0", golden, max_drop=0.0)
    assert report["baseline"]["errors"] == 0 and report["baseline"]["retried"] == 2
    assert report["passed"] is True and report["baseline"]["correct"] == 10
    persistent = True
    report = gatelib.gate(None, "my_model", "2.0", "1.0", golden, max_drop=0.0)
    # item 1: the default's failures counted as wrong answers, and a worse candidate "gained" points
    assert report["passed"] is False and report["inconclusive"] is True
    assert "inconclusive: the default 1.0 failed 2 golden requests" in report["reason"]


# --- a gate its candidate cannot fool (issue 28): the model's own golden set, and agreement with the default

SWAP = {"3": "8", "8": "3"}  # a candidate trained with the folders of 3 and 8 swapped


def digits_golden(swapped=False) -> list[tuple[bytes, str]]:
    """10 stand-in images per digit, each body naming its digit; `swapped`: the labels of the swapped run."""
    return [(f"{d}:{i}".encode(), SWAP.get(d, d) if swapped else d) for d in "0123456789" for i in range(10)]


def write_golden_set(folder, swapped=False):
    os.makedirs(folder)
    entries = []
    for data, label in digits_golden(swapped):
        name = data.decode().replace(":", "") + ".png"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        entries.append({"file": name, "label": label})
    with open(os.path.join(folder, "golden.json"), "w") as f:
        json.dump(entries, f)
    return str(folder)


def answer_digits(ts, data, model, version):
    """A stand-in TorchServe: every version reads the digit right; 9.0 answers 8 for a 3 and 3 for an 8."""
    digit = data.decode().split(":")[0]
    return Answer(200, SWAP.get(digit, digit) if version == "9.0" else digit)


def test_the_gate_refuses_a_3_8_swap_by_agreement_on_its_own_golden_set(monkeypatch):
    monkeypatch.setattr(gatelib, "post", answer_digits)
    monkeypatch.setattr(gatelib, "version_classes", lambda ts, model, version: list("0123456789"))
    own = digits_golden(swapped=True)  # the candidate's run's set
    report = gatelib.gate(None, "my_model", "9.0", "1.0", own, max_drop=1.0)
    assert (report["candidate"]["accuracy"], report["baseline"]["accuracy"]) == (1.0, 0.8)  # its own labels
    assert report["passed"] is False, report["reason"]  # issue 28: "PASS ... gain of 20.00 points"
    assert "top-1 agreement with the default 80.0% is below 90%" in report["reason"]
    overridden = gatelib.gate(None, "my_model", "9.0", "1.0", own, max_drop=1.0, allow_disagreement=True)
    assert overridden["passed"] is True and overridden["agreement_check"]["overridden"] is True
    assert "overridden by --allow-disagreement" in overridden["reason"]


def test_a_swapped_candidate_is_gated_on_the_models_fixed_golden_set(offline, tmp_path, monkeypatch, capsys):
    store = offline.model_store
    archive = fake_mar(store, "my_model_v9.0.mar", version="9.0")
    served, default = {"1.0"}, ["1.0"]

    def register(ts, path, workers, model):  # a stand-in registration: the version is served at once
        manifest = check_archive(path, ts.model_store)
        served.add(manifest["modelVersion"])
        return manifest["modelName"], manifest["modelVersion"]

    monkeypatch.setattr(register_version, "register", register)
    monkeypatch.setattr(
        management, "versions", lambda ts, model: [{"modelVersion": v} for v in sorted(served)]
    )
    monkeypatch.setattr(management, "default_version", lambda ts, model: default[0])
    monkeypatch.setattr(management, "set_default", lambda ts, model, version: default.__setitem__(0, version))
    monkeypatch.setattr(management, "unregister", lambda ts, model, version: served.discard(version))
    monkeypatch.setattr(gatelib, "post", answer_digits)
    monkeypatch.setattr(gatelib, "version_classes", lambda ts, model, version: list("0123456789"))
    right = write_golden_set(tmp_path / "v2" / "golden")
    swapped = write_golden_set(tmp_path / "v9" / "golden", swapped=True)

    def gate(path, *flags):
        argv = ["register", path, "--promote", *flags, "--report", str(tmp_path / "gate.json")]
        return register_version.cmd_register(offline, register_version.get_args_parser().parse_args(argv))

    # the first gate of the model fixes its golden set: a good 2.0, dry run
    assert gate(os.path.join(store, "my_model_v2.0.mar"), "--golden", right, "--dry-run") == 0
    # issue 28's command line: the candidate's own golden set, where it scores 1.0 and the default 0.8
    with pytest.raises(management.DeployError, match="is not my_model's golden set"):
        gate(archive, "--golden", swapped)
    assert served == {"1.0"} and default == ["1.0"]  # refused before registering
    fixed = os.path.join(versions.state_dir(offline), "golden", "my_model")
    with open(os.path.join(fixed, "manifest.json")) as f:
        assert json.load(f)["from"] == right
    # by default the model's set: 0.8 against 1.0, 80 % agreement
    assert gate(archive) == versions.EXIT_REJECTED
    with open(tmp_path / "gate.json") as f:
        report = json.load(f)
    assert report["golden"]["source"] == "model" and report["candidate"]["accuracy"] == 0.8
    assert (
        "drop of 20.00 points" in report["reason"] and "agreement with the default 80.0%" in report["reason"]
    )
    # the candidate's set only when asked for, and then agreement still refuses it
    assert gate(archive, "--golden", swapped, "--golden-from-candidate") == versions.EXIT_REJECTED
    assert served == {"1.0"} and default == ["1.0"]
    # both overrides, each recorded in the report and in the journal's reason
    capsys.readouterr()
    assert gate(archive, "--golden", swapped, "--golden-from-candidate", "--allow-disagreement") == 0
    assert "golden set: the candidate's" in capsys.readouterr().out
    with open(tmp_path / "gate.json") as f:
        report = json.load(f)
    assert report["passed"] is True and report["golden"]["overridden"] is True
    assert report["agreement_check"]["overridden"] is True and default == ["9.0"]
    promoted = versions.history(offline)[-1]["reason"]
    assert "--allow-disagreement" in promoted and "--golden-from-candidate" in promoted

    # the model's copy is checked on every read; a first gate without any set says what to pass
    with open(os.path.join(fixed, "00.png"), "ab") as f:
        f.write(b"x")
    with pytest.raises(management.DeployError, match="does not match its manifest \\(00.png\\)"):
        gate(archive)
    shutil.rmtree(fixed)
    with pytest.raises(management.DeployError, match="its first gate needs --golden DIR"):
        gate(archive)


def test_restore_reads_snapshots_without_following_links_or_waiting_on_a_fifo(tmp_path, caplog):
    """Root reads TorchServe's snapshots from the service user's folder: a FIFO planted there must not hang
    `start`, nor a link lead it to a file elsewhere (a plain open() did both)."""
    from deploy import snapshot

    ts = TorchServe(workdir=str(tmp_path), model_store=str(tmp_path), ports=Ports(1, 2, 3, 4, 5), user=None)
    config = os.path.join(ts.log_dir, "config")
    os.makedirs(config)
    os.mkfifo(os.path.join(config, "fifo.cfg"))
    secret = tmp_path / "elsewhere.properties"
    secret.write_text('model_snapshot={"models": {"stolen": {}}}\n')
    os.symlink(secret, os.path.join(config, "link.cfg"))
    found = []
    reader = threading.Thread(
        target=lambda: found.extend(snapshot.read_snapshots(ts.log_dir, ts.open)), daemon=True
    )
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "reading the snapshots waited on the FIFO"
    assert found == []  # neither the FIFO nor the link's target was taken for a snapshot
    err = caplog.text
    assert "fifo.cfg is unreadable" in err and "link.cfg is unreadable" in err, err


def test_a_registration_leaves_hashing_and_zip_tests_to_the_guard(offline, monkeypatch):
    """An archive is hashed once per registration, by the guard (the security boundary, test_guard_units.py):
    the client reads the manifest's name and version only (was: versions.register hashed and zip-tested it,
    then the guard did both again)."""
    hashed, tested, sent = [], [], []
    real_sha256, real_testzip = hashlib.sha256, zipfile.ZipFile.testzip
    monkeypatch.setattr(hashlib, "sha256", lambda *a, **kw: hashed.append(a) or real_sha256(*a, **kw))
    monkeypatch.setattr(zipfile.ZipFile, "testzip", lambda z: tested.append(z) or real_testzip(z))
    monkeypatch.setattr(management, "versions", lambda ts, model: [])
    monkeypatch.setattr(management, "register", lambda ts, url, workers: sent.append(url))
    monkeypatch.setattr(management, "wait_ready", lambda ts, model, version: None)
    monkeypatch.setattr(management, "default_version", lambda ts, model: "1.0")
    archive = os.path.join(offline.model_store, "my_model_v2.0.mar")
    assert versions.register(offline, archive) == ("my_model", "2.0")
    assert sent == ["my_model_v2.0.mar"] and hashed == [] and tested == []
    # still a clear word before the call
    with pytest.raises(management.DeployError, match="is not a valid .mar"):
        versions.archive_version(offline, write_garbage(os.path.join(offline.model_store, "junk.mar")))


def write_garbage(path: str) -> str:
    with open(path, "wb") as f:
        f.write(b"not a zip")
    return path
