"""The tools in scripts/: the benchmark and soak tools run end to end and write well-formed output (no timing
asserts; slow, real TorchServe); the shell wrappers and the archive builder on their own (fast, no server)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import types

import pytest

from bundle.settings import ROOT
from deploy.archive import archive_checkpoint, verify_checksum
from model_src import backends
from model_src.manifest import Manifest


@pytest.mark.slow
@pytest.mark.torchserve
def test_bench_runs_and_writes_json_and_png(checkpoint, digits, tmp_path):
    from bench.bench import STAGES, get_args_parser, main

    out = tmp_path / "bench"
    args = ["--targets", "digits", "--backends", "onnx,eager", "--concurrency", "1,16", "--seconds", "2"]
    args += ["--batching", "1,8", "--no-peer", "--peers", ""]
    args += ["--digits-checkpoint", checkpoint, "--out", str(out)]
    main(get_args_parser().parse_args(args))
    report = json.load(open(out / "bench.json"))
    (res,) = report["results"]
    assert report["cores"] >= 1 and res["model"] == "digits"
    # the limit at the batch size each level makes (c=1: 1; c=16 over 2 workers: the configured 4), next to
    # its row
    assert set(res["limit"]) == {"onnx", "eager"}
    assert set(res["limit"]["onnx"]) == {"batch_1", "batch_4", "json_1", "json_8"}
    assert all(len(v) >= 1 and min(v) > 0 for row in res["limit"].values() for v in row.values())
    # the no-op ceiling and each backend at every level, from wrk: answers, no errors, an estimate to compare
    # with
    assert [r["concurrency"] for r in res["ceiling"]] == [1, 16]
    for rows in res["served"].values():
        assert [r["concurrency"] for r in rows] == [1, 16]
        assert all(
            r["requests"] > 0 and r["errors"] == 0 and r["statuses"] == {"200": r["requests"]} for r in rows
        )
        assert all(0 < r["vs_estimate"] and r["estimate_rps"] > 0 for r in rows)
        # the ideal handler (the no-op spending the limit's CPU) next to each row that has an estimate
        assert all(r["ideal"]["errors"] == 0 and r["ideal_rps"] > 0 and r["vs_ideal"] > 0 for r in rows)
        assert all(0 <= r["steal_share"] < 1 and r["rps_unstolen"] >= r["throughput_rps"] for r in rows)
    assert all(
        v == {"requests": res["images"], "wrong_labels": 0, "errors": 0} for v in res["checked"].values()
    )
    assert [r["images_per_request"] for r in res["batching"]] == [1, 8]
    assert all(r["served"]["errors"] == 0 and r["images_per_s"] > 0 for r in res["batching"])
    # the breakdown: every stage present for each backend, model and decode measured
    assert set(res["breakdown_ms"]) == {"onnx", "eager", "onnx ideal", "eager ideal"}
    for label, parts in res["breakdown_ms"].items():
        assert set(STAGES) <= set(parts) and parts["frontend"] > 0
        assert parts["spent"] > 0 if label.endswith("ideal") else parts["model"] > 0 and parts["decode"] > 0
    assert res["cold_start_s"] > 0 and res["registration_s"]["eager"] > 0
    # one export for every backend, each checked; what `--backend auto` makes of it (digits: not measured)
    assert set(res["export"]) == {"onnx", "eager"} and all(
        e["max_diff"] <= 1e-4 for e in res["export"].values()
    )
    assert res["backend_choice"]["backend"] == "onnx" and "not measured" in res["backend_choice"]["rule"]
    for png in ("bench.png", "bench_breakdown.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrk_refuses_other_hosts():
    from bench.wrk import WrkError, post_files

    with pytest.raises(WrkError, match="non-loopback"):
        post_files("http://example.com/predictions/my_model", "key", [__file__], 1, 1)


def test_loadgen_refuses_other_hosts_and_its_cli_says_so():
    from bench import loadgen

    with pytest.raises(loadgen.LoadgenError, match="non-loopback target example.com"):
        loadgen.run("http://example.com/predictions/my_model", [b"x"], 1, 1)
    with pytest.raises(SystemExit, match="^loadgen: refusing non-loopback target example.com$"):
        loadgen.main(["--url", "http://example.com/predictions/my_model", __file__])


def test_noop_handler_answers_every_request():
    from bench.noop_handler import handle

    assert [json.loads(a) for a in handle([{"body": b"x"}, {"body": b"y"}], None)] == [{"0": 1.0}] * 2
    assert handle(None, None) is None  # TorchServe's initialisation call


def test_busy_handler_spends_the_cpu_it_is_told_per_image(tmp_path):
    import time
    from types import SimpleNamespace

    from bench import noop_handler

    busy = tmp_path / "busy.us"
    busy.write_text("20000")  # 20 ms per image
    handle = noop_handler.handle
    assert handle(None, SimpleNamespace(model_yaml_config={"handler": {"busy_file": str(busy)}})) is None
    try:
        t0 = time.thread_time()
        assert [json.loads(a) for a in handle([{"body": b"x"}] * 3, None)] == [{"0": 1.0}] * 3
        assert time.thread_time() - t0 >= 0.06  # 3 images x 20 ms of this thread's own CPU
        busy.write_text("0")  # the bench rewrites it between rows; the handler follows
        os.utime(busy, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
        handle([{"body": b"x"}], None)
        assert noop_handler.busy["us"] == 0
    finally:
        noop_handler.busy["file"] = None  # module state: leave the plain no-op for other tests


@pytest.mark.slow
@pytest.mark.torchserve
def test_soak_runs_and_writes_a_summary(checkpoint, digits, tmp_path):
    from bench.soak import main

    rc = main(
        [
            "--checkpoint",
            checkpoint,
            "--scenarios",
            "load,restart",
            "--requests",
            "300",
            "--concurrency",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    summary = json.load(open(tmp_path / "soak.json"))
    assert rc == 0
    assert summary["results"]["load"]["requests"] == 300 and summary["results"]["load"]["passed"]
    assert summary["results"]["restart"]["after"]["default"] == "2.0"


# --- the archive builder ------------------------------------------------------------------------------------


def fake_export(fail=False):
    """Stands in for train.export (no checkpoint, no torch export): writes what archive_checkpoint
    packages."""

    def export_all(checkpoint, export_dir, formats, optional=frozenset()):
        if fail:
            raise RuntimeError("export failed on purpose")
        os.makedirs(export_dir)
        files = {fmt: backends.get(fmt).file for fmt in formats}
        for name in files.values():
            with open(os.path.join(export_dir, name), "w") as f:
                f.write("weights")
        report = {"formats": {fmt: {"max_diff": 0.0} for fmt in formats}}
        Manifest({}, ["0"], {}, files=files, checks=report).write(export_dir)
        return report

    return types.SimpleNamespace(export_all=export_all)


def test_archive_builds_when_tmpdir_is_another_filesystem(tmp_path, monkeypatch):
    other = "/dev/shm"  # a tmpfs, like /tmp on Fedora, Arch or Debian 13
    if (
        not os.path.isdir(other)
        or not os.access(other, os.W_OK)
        or os.stat(other).st_dev == os.stat(tmp_path).st_dev
    ):
        pytest.skip(f"needs {other} writable and on another filesystem than {tmp_path}")
    tmp = tempfile.mkdtemp(dir=other)
    try:
        monkeypatch.setenv("TMPDIR", tmp)
        monkeypatch.setattr(tempfile, "tempdir", tmp)
        store = tmp_path / "store"
        monkeypatch.setitem(sys.modules, "train.export", fake_export())
        # os.link raised EXDEV here
        info = archive_checkpoint("unused.pt", "3.0", "eager", model_store=str(store))
        assert info["archive"] == str(store / "my_model_v3.0.mar")
        assert verify_checksum(info["archive"]) == info["sha256"]
        # no build folder
        assert sorted(os.listdir(store)) == [
            "my_model_v3.0.mar",
            "my_model_v3.0.mar.sha256",
        ]

        monkeypatch.setitem(sys.modules, "train.export", fake_export(fail=True))
        with pytest.raises(RuntimeError, match="on purpose"):
            archive_checkpoint("unused.pt", "4.0", "eager", model_store=str(store))
        # nothing left over
        assert sorted(os.listdir(store)) == [
            "my_model_v3.0.mar",
            "my_model_v3.0.mar.sha256",
        ]
        assert os.listdir(tmp) == []  # and nothing was built in TMPDIR
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the shell wrappers, in a copy of the repository whose .venv/bin/python only records its calls ----------

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for .venv/bin/python: logs each call (working directory, arguments) as one JSON line;
# `-m pip` fails while FAKE_PIP_FAILS is set and otherwise creates its --target like pip.
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$PWD" "$@" >> "$FAKE_PYTHON_LOG"
if [ "${1:-} ${2:-}" = "-m pip" ]; then
  [ -z "${FAKE_PIP_FAILS:-}" ] || { echo "ERROR: pip failed on purpose" >&2; exit 1; }
  prev=
  for a in "$@"; do [ "$prev" = --target ] && mkdir -p "$a"; prev=$a; done
fi
exit 0
"""


def fake_repo(tmp_path, *names):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in names:
        shutil.copy2(os.path.join("scripts", name), repo / "scripts" / name)
    python = repo / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    java = tmp_path / "bin" / "java"  # setup.sh checks for Java 17: never let it reach for apt-get
    java.parent.mkdir()
    java.write_text("#!/bin/sh\necho 'openjdk version \"17.0.15\" 2025-04-15' >&2\n")
    java.chmod(0o755)
    (repo / "requirements.txt").write_text("torch==2.14.1\n")
    return repo


def run_script(tmp_path, repo, argv, cwd=None, **env):
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "FAKE_PYTHON_LOG": str(log),
        **env,
    }
    out = subprocess.run(argv, cwd=cwd or repo, env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return out, calls


def test_setup_fails_and_writes_no_stamp_when_pip_fails(tmp_path):
    repo = fake_repo(tmp_path, "setup.sh")
    stamp = repo / ".venv" / ".requirements.sha256"
    out, _ = run_script(tmp_path, repo, ["scripts/setup.sh"], FAKE_PIP_FAILS="1")
    assert out.returncode != 0  # was 0, with "setup: done" and the stamp written
    assert "pip failed on purpose" in out.stderr and "setup: pip install failed" in out.stderr
    assert "setup: done" not in out.stdout and not stamp.exists()
    out, calls = run_script(tmp_path, repo, ["scripts/setup.sh"])  # so the next run installs again
    assert out.returncode == 0, out.stderr
    assert "setup: done" in out.stdout and stamp.exists()
    assert ["-m", "pip", "install"] == calls[0][1:4]


def test_wrappers_take_paths_relative_to_the_callers_directory(tmp_path):
    repo = fake_repo(tmp_path, "archive.sh", "register_version.sh", "predict.sh", "paths.sh")
    runs = tmp_path / "work" / "runs"
    (runs / "v1").mkdir(parents=True)
    (runs / "v1" / "checkpoint_best.pt").write_bytes(b"")
    (runs / "3.png").write_bytes(b"")
    scripts = os.path.relpath(repo / "scripts", runs)

    out, calls = run_script(
        tmp_path,
        repo,
        [f"{scripts}/archive.sh", "3.0", "v1/checkpoint_best.pt", "--output", "a.mar"],
        cwd=runs,
    )
    assert out.returncode == 0, out.stderr  # was: "archive: checkpoint v1/checkpoint_best.pt not found"
    ((where, *argv),) = calls
    assert where == str(repo)
    assert argv == [
        *[
            "-m",
            "deploy.archive",
            "--version",
            "3.0",
            "--checkpoint",
            str(runs / "v1" / "checkpoint_best.pt"),
        ],
        *["--output", str(runs / "a.mar")],
    ]

    argv = ["x.mar", "--promote", "--golden", "v1/golden", "--report=gate.json", "--max-accuracy-drop", "1.0"]
    out, calls = run_script(tmp_path, repo, [f"{scripts}/register_version.sh", *argv], cwd=runs)
    assert out.returncode == 0, out.stderr
    assert calls[0][1:] == [
        *["-m", "deploy.register_version", "register", str(runs / "x.mar"), "--promote"],
        *[
            "--golden",
            str(runs / "v1" / "golden"),
            f"--report={runs / 'gate.json'}",
            "--max-accuracy-drop",
            "1.0",
        ],
    ]
    out, calls = run_script(tmp_path, repo, [f"{scripts}/register_version.sh", "unregister", "2.0"], cwd=runs)
    assert calls[0][1:] == ["-m", "deploy.register_version", "unregister", "2.0"]

    out, calls = run_script(tmp_path, repo, [f"{scripts}/predict.sh", "3.png", "2.0"], cwd=runs)
    assert out.returncode == 0, out.stderr
    assert calls[0][1:] == ["-m", "deploy.predict", "--raw", "--version", "2.0", str(runs / "3.png")]


def test_register_version_help_prints_help(tmp_path):
    """Run for real (its Python too), from another directory, with no TorchServe needed
    (was: "--help is not in the model store", or "TorchServe is not running")."""
    script = os.path.join(ROOT, "scripts", "register_version.sh")
    for flag in ("--help", "-h"):
        out = subprocess.run([script, flag], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("usage: scripts/register_version.sh ARCHIVE")
        assert "{register,list,rollback,unregister}" in out.stdout and "--allow-new-classes" in out.stdout


def test_bench_overload_runs_the_overload_benchmark(tmp_path):
    repo = fake_repo(tmp_path, "setup.sh", "bench.sh")
    digest = subprocess.run(
        ["sha256sum", "requirements.txt"], cwd=repo, capture_output=True, text=True
    ).stdout
    (repo / ".venv" / ".requirements.sha256").write_text(digest.split()[0] + "\n")  # setup.sh: up to date
    out, calls = run_script(tmp_path, repo, ["scripts/bench.sh", "overload", "--levels", "16,600"])
    assert out.returncode == 0, out.stderr
    assert [c[1:] for c in calls] == [["-m", "bench.overload", "--levels", "16,600"]]


# --- the judge of the load tests (bench/loadgen.check): each wrong kind of answer is caught ----------------


def answer(status: int, body: bytes):
    import requests

    resp = requests.Response()
    resp.status_code, resp._content = status, body
    return resp


def test_loadgen_check_catches_every_wrong_answer():
    from bench.loadgen import check

    right = answer(200, b'{"3": 0.9, "5": 0.1}')
    assert check(right, "3") and check(answer(400, b'{"code": 400, "message": "no image"}'), None)
    assert check(answer(503, b"Prediction failed"), "3")  # 5xx: run() counts it under errors instead
    wrong = {
        "other label": (answer(200, b'{"5": 0.9, "3": 0.1}'), "3"),
        "200 not JSON": (answer(200, b"<html>proxy page</html>"), "3"),
        "200 a JSON list": (answer(200, b'["3"]'), "3"),
        "200 empty answer": (answer(200, b"{}"), "3"),
        "4xx for a good image": (answer(400, b'{"message": "x"}'), "3"),
        "bad body answered": (answer(200, b'{"3": 1.0}'), None),
        "bad body refused without JSON": (answer(400, b"Bad Request"), None),
        "bad body refused without message": (answer(413, b'{"code": 413}'), None),
        "bad body refused with a list": (answer(400, b'["message"]'), None),
        "bad body 5xx": (answer(500, b'{"message": "x"}'), None),
    }
    assert [name for name, (resp, expected) in wrong.items() if check(resp, expected)] == []


def test_loadgen_check_reads_kserve_answers_and_catches_their_wrong_ones():
    """Each answer judged in the form its route owes (review: a v2 route answering the handler's own form, a
    v2 answer of another model, a v1 route answering v2, a 404 for a bad body all passed)."""
    from bench.loadgen import check

    def v2(label, name="predictions", model="m"):
        outputs = [{"name": name, "datatype": "BYTES", "data": [json.dumps({label: 0.9, "0": 0.1})]}]
        return answer(200, json.dumps({"model_name": model, "outputs": outputs}).encode())

    v1 = answer(200, b'{"predictions": [{"3": 0.9}]}')
    NOT_JSON_V2 = b'{"model_name": "m", "outputs": [{"name": "predictions", "data": ["x"]}]}'  # noqa: N806
    own = answer(200, b'{"3": 0.9, "5": 0.1}')
    assert check(v2("3"), "3", "v2", "m") and check(v1, "3", "v1") and check(own, "3")
    wrong = {
        "v2 other label": (v2("5"), "v2"),
        "v2 error output": (v2("3", name="error"), "v2"),
        "v2 of another model": (v2("3", model="other"), "v2"),
        "v2 route, the handler's own form": (own, "v2"),
        "v2 no outputs": (answer(200, b'{"model_name": "m", "outputs": []}'), "v2"),
        "v2 data not JSON": (answer(200, NOT_JSON_V2), "v2"),
        "v1 other label": (answer(200, b'{"predictions": [{"5": 0.9, "3": 0.1}]}'), "v1"),
        "v1 empty": (answer(200, b'{"predictions": []}'), "v1"),
        "v1 route, v2 form": (v2("3"), "v1"),
        "own route, v1 form": (v1, None),
        "mixed value types": (answer(200, b'{"3": 0.9, "5": "x"}'), None),
    }  # fmt: skip
    assert [name for name, (resp, form) in wrong.items() if check(resp, "3", form, "m")] == []
    refused = {code: check(answer(code, b'{"message": "x"}'), None) for code in (400, 404, 413, 415, 429)}
    assert refused == {400: True, 404: False, 413: True, 415: True, 429: False}


def test_loadgen_run_counts_unparsable_answers_as_wrong():
    """run() against a tiny loopback server: an answer the judge cannot parse is a wrong answer, not a
    pass."""
    import http.server
    import threading

    from bench.loadgen import run

    replies = {b"3": b'{"3": 0.9, "5": 0.1}', b"5": b'{"3": 0.9, "5": 0.1}', b"x": b"not json"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = replies[self.rfile.read(int(self.headers["Content-Length"]))]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{httpd.server_address[1]}/predictions/m"
            r = run(url, [b"3", b"5", b"x"], concurrency=1, total=6, expect=["3", "5", "3"])
        finally:
            httpd.shutdown()
    assert r["statuses"] == {"200": 6} and r["errors"] == 0
    assert r["wrong_labels"] == 4  # "5" answered 3, and "not json", twice each


def test_require_tool_fails_under_ci_and_skips_elsewhere(monkeypatch):
    from tests.conftest import require_tool

    assert require_tool("sh") == shutil.which("sh")
    monkeypatch.setenv("CI", "1")
    # a skip raised here would escape pytest.raises(Failed) and skip this test: catch both and ask which it
    # was
    with pytest.raises(
        (pytest.fail.Exception, pytest.skip.Exception), match="no-such-tool-30 not found"
    ) as under_ci:
        require_tool("no-such-tool-30")
    assert under_ci.type is pytest.fail.Exception and str(under_ci.value).startswith("CI: "), under_ci.value
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-30 not found"):
        require_tool("no-such-tool-30")
