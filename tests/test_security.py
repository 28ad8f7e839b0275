"""What a hostile review of the running bundle found (docs/security.md), each against a real TorchServe:
keys never readable by others, registration only of checked archives from the model store, a private temp
dir for every server, the service user when started as root, and clients that keep keys to their server."""

import glob
import http.server
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import zipfile

import psutil
import pytest
import requests

from deploy import settings
from deploy.server import Ports, TorchServe
from tests.conftest import install_archive

pytestmark = [pytest.mark.slow, pytest.mark.torchserve]


def server_processes(ts):
    frontend = psutil.Process(ts.pid())
    return [frontend, *frontend.children(recursive=True)]


def umask_of(proc) -> int:
    with open(f"/proc/{proc.pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)


def unpacked_model_dir(archive, dest):
    """A model directory as TorchServe would load it: the archive's files, unpacked, with no checksum."""
    with zipfile.ZipFile(archive) as z:
        z.extractall(dest)
    return str(dest)


def test_keys_logs_and_snapshots_are_never_readable_by_others(archive_factory, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    install_archive(archive_factory("1.0"), store, "my_model.mar")
    ts = TorchServe(workdir=str(tmp_path / "ts"), model_store=str(store), ports=Ports.free(), user=None)
    seen, done = [], threading.Event()

    def watch():  # TorchServe writes key_file.json with the process umask, then tightens it ~1 ms later
        while not done.is_set():
            try:
                seen.append(stat.S_IMODE(os.stat(ts.key_file).st_mode))
            except FileNotFoundError:
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        ts.start()
        done.set()
        watcher.join()
        assert seen and all(mode & 0o077 == 0 for mode in seen), sorted(set(map(oct, seen)))
        assert {umask_of(p) for p in server_processes(ts)} == {0o077}  # was 0o022: keys 0644 for a moment
        ts.request("PUT", "management", "/models/my_model?min_worker=1&synchronous=true")  # writes a snapshot
        written = [p for p in glob.glob(os.path.join(ts.workdir, "**"), recursive=True) if os.path.isfile(p)]
        assert any(p.endswith(".cfg") for p in written) and any(p.endswith("ts_log.log") for p in written)
        loose = {p: oct(os.stat(p).st_mode & 0o777) for p in written if os.stat(p).st_mode & 0o077}
        assert loose == {}
    finally:
        done.set()
        ts.stop()


def test_only_checked_archives_from_the_model_store_can_be_registered(server, store, archive_factory, tmp_path):
    model_dir = unpacked_model_dir(archive_factory("9.0"), tmp_path / "anywhere")
    tampered = install_archive(archive_factory("9.0"), store, "tampered.mar")
    with open(tampered, "ab") as f:
        f.write(b"\0")  # no longer matches its .sha256
    attempts = {
        "absolute directory": ("POST", f"/models?url={model_dir}&model_name=evil&synchronous=true", None),
        "directory in the body": ("POST", "/models", json.dumps({"url": model_dir, "model_name": "evil"})),
        "doubled slash": ("POST", f"//models?url={model_dir}&model_name=evil", None),
        "encoded path": ("POST", f"/%6Dodels?url={model_dir}&model_name=evil", None),
        "tampered archive": ("POST", "/models?url=tampered.mar&synchronous=true", None),
        "two urls": ("POST", "/models?url=my_model.mar&url=/etc&synchronous=true", None),
        "workflow": ("POST", "/workflows?url=x.war", None),
    }
    for name, (method, path, body) in attempts.items():
        headers = {"Content-Type": "application/json"} if body else {}
        resp = server.request(method, "management", path, data=body, headers=headers)
        assert resp.status_code == 403, (name, resp.status_code, resp.text)  # the directory was 200: registered
        assert resp.json()["message"].startswith("registration refused"), name
    names = [m["modelName"] for m in server.request("GET", "management", "/models").json()["models"]]
    assert names == ["my_model"]
    # The guard forwards everything else, keys included: a wrong key is still TorchServe's 400.
    wrong = requests.get(server.url("management") + "/models", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 400
    os.remove(tampered)
    os.remove(tampered + ".sha256")


def test_every_server_keeps_its_temporary_files_in_a_private_folder(archive_factory, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    install_archive(archive_factory("1.0"), store, "my_model.mar")
    ts = TorchServe(workdir=str(tmp_path / "ts"), model_store=str(store), ports=Ports.free(), user=None)
    try:
        ts.start()
        assert stat.S_IMODE(os.stat(ts.tmp_dir).st_mode) == 0o700
        for proc in server_processes(ts):
            assert proc.environ()["TMPDIR"] == ts.tmp_dir  # was the shared /tmp for the live server
        # the unpacked model a worker loads (the handler's code) lies in the private folder, not /tmp/models
        unpacked = glob.glob(os.path.join(ts.tmp_dir, "models", "*", "image_classifier.py"))
        assert unpacked, os.listdir(ts.tmp_dir)
    finally:
        ts.stop()


def service_user_can_run_here():
    if os.geteuid() != 0:
        return "only root can start a server as another user"
    try:
        pwd.getpwnam(settings.SERVICE_USER)
    except KeyError:
        return f"user {settings.SERVICE_USER} missing (scripts/setup.sh creates it)"
    return None


@pytest.mark.skipif(service_user_can_run_here() is not None, reason=str(service_user_can_run_here()))
def test_started_as_root_the_server_runs_as_the_service_user(archive_factory, digits):
    base = tempfile.mkdtemp(prefix="ts-user-")  # pytest's folders are root's alone: this one others may enter
    try:
        os.chmod(base, 0o755)
        store = os.path.join(base, "store")
        os.makedirs(store)
        install_archive(archive_factory("1.0"), store, "my_model.mar")
        ts = TorchServe(workdir=os.path.join(base, "ts"), model_store=store, ports=Ports.free())
        assert ts.user == settings.SERVICE_USER
        ts.prepare_dirs()
        missing = ts.unreachable()
        if missing:  # e.g. a Python installed in root's home (pyenv under /root, 0700): start() warns, runs as root
            pytest.skip(f"{settings.SERVICE_USER} cannot reach {missing} from this checkout's location")
        try:
            ts.start()
            uid = pwd.getpwnam(settings.SERVICE_USER).pw_uid
            procs = server_processes(ts)
            assert len(procs) >= 3 and {p.uids().effective for p in procs} == {uid}  # frontend and workers
            guard = [p for p in psutil.process_iter(["cmdline"]) if "deploy.guard" in " ".join(p.info["cmdline"] or [])]
            assert guard and all(p.uids().effective == uid for p in guard if ts.tmp_dir in " ".join(p.cmdline()))
            assert os.stat(ts.key_file).st_uid == uid and stat.S_IMODE(os.stat(ts.key_file).st_mode) == 0o600
            check = "import os, sys; print(os.access(sys.argv[1], os.W_OK), os.access(sys.argv[1], os.R_OK))"
            out = subprocess.run([sys.executable, "-c", check, store], capture_output=True, text=True, **ts.as_user())
            assert out.stdout.split() == ["False", "True"]  # model store: readable, not writable
            with open(glob.glob(os.path.join(settings.DIGITS_DIR, "val", "3", "*.png"))[0], "rb") as f:
                assert ts.request("POST", "inference", "/predictions/my_model", data=f.read()).status_code == 200
        finally:
            ts.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_printed_commands_read_the_key_from_stdin(server, png, tmp_path):
    with open(os.path.join(settings.ROOT, "scripts", "quickstart.sh")) as f:
        curls = [line for line in f if "curl " in line and "127.0.0.1:808" in line]
    assert curls and not [line for line in curls if "Bearer" in line or "key_file" in line]  # was: Bearer $(python3…)
    assert all("| curl -H @- " in line for line in curls if ":8082" not in line)
    image = tmp_path / "3.png"
    image.write_bytes(png)
    pipeline = (
        f"{sys.executable} -m deploy.serve header | curl -s -o /dev/null -w '%{{http_code}}' -H @- -T {image} "
        f"{server.url()}/predictions/my_model"
    )
    env = {**os.environ, "TS_KEY_FILE": server.key_file}
    out = subprocess.run(["bash", "-c", pipeline], cwd=settings.ROOT, env=env, capture_output=True, text=True)
    assert out.stdout == "200", out.stderr


class KeyRecorder(http.server.HTTPServer):
    """A stand-in API that refuses every key the way TorchServe refuses an expired one, and remembers."""

    def __init__(self, host, port=0):
        super().__init__((host, port), KeyRecorderHandler)
        self.seen = []


class KeyRecorderHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        body = json.dumps({"code": 400, "message": "Token Authorization failed. Token either incorrect, expired"})
        self.send_response(200 if self.path.startswith("/token") else 400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def serve_in_background(stub):
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    return stub


def test_keys_go_only_to_the_server_they_came_from(tmp_path, monkeypatch, png):
    from deploy import predict

    workdir = tmp_path / "ts"
    (workdir / "logs").mkdir(parents=True)
    keys = {"inference": {"key": "inf"}, "management": {"key": "mgmt"}, "API": {"key": "api-never-expires"}}
    (workdir / "key_file.json").write_text(json.dumps(keys))
    own = serve_in_background(KeyRecorder("127.0.0.1"))  # the key file's server: its management port
    port = own.server_port
    elsewhere = serve_in_background(KeyRecorder("127.0.0.2"))  # where TS_INFERENCE_URL points
    lookalike = serve_in_background(KeyRecorder("127.0.0.2", port))  # that host's "management port"
    (workdir / "logs" / "generated.config.properties").write_text(
        f"inference_address=http://127.0.0.1:1\nmanagement_address=http://127.0.0.1:{port}\n"
    )
    image = tmp_path / "3.png"
    image.write_bytes(png)
    monkeypatch.setenv("TS_KEY_FILE", str(workdir / "key_file.json"))
    monkeypatch.setenv("TS_INFERENCE_URL", f"http://127.0.0.2:{elsewhere.server_port}")
    try:
        predict.main(["--raw", str(image)])
        assert [auth for _, auth in elsewhere.seen] == ["Bearer inf", "Bearer inf"]  # the inference key only
        assert lookalike.seen == []  # was: GET /token?type=inference with the API key, to that host
        assert own.seen == [("/token?type=inference", "Bearer api-never-expires")]
        monkeypatch.setenv("TS_INFERENCE_URL", "http://10.11.12.13:8080")  # never contacted: refused before
        with pytest.raises(SystemExit, match="refusing to send the inference key to 10.11.12.13 over plain HTTP"):
            predict.main(["--raw", str(image)])
        monkeypatch.setenv("TS_ALLOW_PLAIN_HTTP", "1")  # said explicitly: the target is taken as given
        assert predict.target().url() == "http://10.11.12.13:8080"
    finally:
        for stub in (own, elsewhere, lookalike):
            stub.shutdown()
            stub.server_close()
