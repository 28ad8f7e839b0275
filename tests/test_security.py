"""What a hostile review of the running bundle found (docs/security.md), each against a real TorchServe:
keys never readable by others, registration only of checked archives from the model store, a private temp
dir for every server, the service user when started as root, and clients that keep keys to their server."""

import argparse
import glob
import http.server
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import psutil
import pytest
import requests

from bundle import settings
from deploy.server import Ports, ServerError, TorchServe
from tests.conftest import cannot_run, install_archive

# in_order: the service_server tests share one server, and the frozen-guard test stops it (it runs last)
pytestmark = [pytest.mark.slow, pytest.mark.torchserve, pytest.mark.in_order]


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


def test_only_checked_archives_from_the_model_store_can_be_registered(
    server, store, archive_factory, tmp_path
):
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
        # the directory was 200: registered
        assert resp.status_code == 403, (
            name,
            resp.status_code,
            resp.text,
        )
        assert resp.json()["message"].startswith("registration refused"), name
    names = [m["modelName"] for m in server.request("GET", "management", "/models").json()["models"]]
    assert names == ["my_model"]
    # The guard forwards everything else, keys included: a wrong key is still TorchServe's 400.
    wrong = requests.get(
        server.url("management") + "/models", headers={"Authorization": "Bearer nope"}, timeout=30
    )
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


def test_started_as_root_the_server_runs_as_the_service_user(archive_factory, digits):
    if service_user_can_run_here():
        cannot_run(service_user_can_run_here())
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
        # e.g. a Python installed in root's home (pyenv under /root, 0700): start() warns, runs as root
        if missing:
            cannot_run(f"{settings.SERVICE_USER} cannot reach {missing} from this checkout's location")
        try:
            ts.start()
            uid = pwd.getpwnam(settings.SERVICE_USER).pw_uid
            procs = server_processes(ts)
            assert len(procs) >= 3 and {p.uids().effective for p in procs} == {uid}  # frontend and workers
            guard = [
                p
                for p in psutil.process_iter(["cmdline"])
                if "deploy.guard" in " ".join(p.info["cmdline"] or [])
            ]
            assert guard and all(
                p.uids().effective == uid for p in guard if ts.tmp_dir in " ".join(p.cmdline())
            )
            assert os.stat(ts.key_file).st_uid == uid and stat.S_IMODE(os.stat(ts.key_file).st_mode) == 0o600
            check = "import os, sys; print(os.access(sys.argv[1], os.W_OK), os.access(sys.argv[1], os.R_OK))"
            out = subprocess.run(
                [sys.executable, "-c", check, store], capture_output=True, text=True, **ts.as_user()
            )
            assert out.stdout.split() == ["False", "True"]  # model store: readable, not writable
            with open(glob.glob(os.path.join(settings.DIGITS_DIR, "val", "3", "*.png"))[0], "rb") as f:
                assert (
                    ts.request("POST", "inference", "/predictions/my_model", data=f.read()).status_code == 200
                )
        finally:
            ts.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_printed_commands_read_the_key_from_stdin(server, png, tmp_path):
    with open(os.path.join(settings.ROOT, "scripts", "quickstart.sh")) as f:
        curls = [line for line in f if "curl " in line and "127.0.0.1:808" in line]
    # was: Bearer $(python3…)
    assert curls and not [line for line in curls if "Bearer" in line or "key_file" in line]
    assert all("| curl -H @- " in line for line in curls if ":8082" not in line)
    image = tmp_path / "3.png"
    image.write_bytes(png)
    pipeline = (
        f"{sys.executable} -m deploy.serve header | curl -s -o /dev/null -w '%{{http_code}}' -H @- -T "
        f"{image} {server.url()}/predictions/my_model"
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
        body = json.dumps(
            {"code": 400, "message": "Token Authorization failed. Token either incorrect, expired"}
        )
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
    from deploy import client, predict

    workdir = tmp_path / "ts"  # a server's folder as start() lays it out: key file in home/, config in run/
    (workdir / "home").mkdir(parents=True)
    (workdir / "run").mkdir()
    keys = {"inference": {"key": "inf"}, "management": {"key": "mgmt"}, "API": {"key": "api-never-expires"}}
    (workdir / "home" / "key_file.json").write_text(json.dumps(keys))
    own = serve_in_background(KeyRecorder("127.0.0.1"))  # the key file's server: its management port
    port = own.server_port
    elsewhere = serve_in_background(KeyRecorder("127.0.0.2"))  # where TS_INFERENCE_URL points
    lookalike = serve_in_background(KeyRecorder("127.0.0.2", port))  # that host's "management port"
    (workdir / "run" / "generated.config.properties").write_text(
        f"inference_address=http://127.0.0.1:1\nmanagement_address=http://127.0.0.1:{port}\n"
    )
    image = tmp_path / "3.png"
    image.write_bytes(png)
    monkeypatch.setenv("TS_KEY_FILE", str(workdir / "home" / "key_file.json"))
    monkeypatch.setenv("TS_INFERENCE_URL", f"http://127.0.0.2:{elsewhere.server_port}")
    try:
        predict.main(["--raw", str(image)])
        assert [auth for _, auth in elsewhere.seen] == ["Bearer inf", "Bearer inf"]  # the inference key only
        assert lookalike.seen == []  # was: GET /token?type=inference with the API key, to that host
        assert own.seen == [("/token?type=inference", "Bearer api-never-expires")]
        monkeypatch.setenv("TS_INFERENCE_URL", "http://10.11.12.13:8080")  # never contacted: refused before
        with pytest.raises(
            SystemExit, match="refusing to send the inference key to 10.11.12.13 over plain HTTP"
        ):
            predict.main(["--raw", str(image)])
        monkeypatch.setenv("TS_ALLOW_PLAIN_HTTP", "1")  # said explicitly: the target is taken as given
        assert client.target().url() == "http://10.11.12.13:8080"
    finally:
        for stub in (own, elsewhere, lookalike):
            stub.shutdown()
            stub.server_close()


# --- privilege boundaries: the service user's folder, its firewall, its guard -------------------------------


def service_server_in(base, archive_factory) -> TorchServe:
    """A server as the service user in `base` (0755, which others may enter; pytest's folders are root's
    alone), its folders prepared; skips where the service user cannot run this checkout."""
    os.chmod(base, 0o755)
    store = os.path.join(base, "store")
    os.makedirs(store)
    install_archive(archive_factory("1.0"), store, "my_model.mar")
    ts = TorchServe(workdir=os.path.join(base, "ts"), model_store=store, ports=Ports.free())
    ts.prepare_dirs()
    missing = ts.unreachable()
    if missing:
        cannot_run(f"{settings.SERVICE_USER} cannot reach {missing} from this checkout's location")
    return ts


@pytest.fixture(scope="module")
def service_server(archive_factory, digits):
    """One server started by root as the service user, shared by the tests below; the last one stops it."""
    if service_user_can_run_here():
        cannot_run(service_user_can_run_here())
    base = tempfile.mkdtemp(prefix="ts-user-")
    try:
        ts = service_server_in(base, archive_factory)
        ts.start()
        yield ts
        ts.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def connect_as(user: str, port: int) -> int:
    """errno of a TCP connect to 127.0.0.1:port by a process of `user` (0: connected)."""
    code = "import socket, sys; print(socket.socket().connect_ex(('127.0.0.1', int(sys.argv[1]))))"
    entry = pwd.getpwnam(user)
    out = subprocess.run(
        [sys.executable, "-c", code, str(port)], capture_output=True, text=True, timeout=60, cwd="/",
        user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


SQUAT = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen()
except OSError as e:
    print("refused", e.errno, flush=True)
    sys.exit(0)
print("listening", flush=True)
s.settimeout(float(sys.argv[2]))
got = b""
try:
    while True:
        conn, _ = s.accept()
        conn.settimeout(2)
        try:
            got += conn.recv(65536)
        except OSError:
            pass
except OSError:
    pass
print("received", len(got), flush=True)
"""


def squat(user: str, port: int, seconds: float = 5) -> subprocess.Popen:
    """A process of `user` that listens on 127.0.0.1:port for `seconds` and says how many bytes it was sent
    (or 'refused ERRNO' when it cannot listen there); its first line is read before this returns."""
    entry = pwd.getpwnam(user)
    proc = subprocess.Popen(
        [sys.executable, "-c", SQUAT, str(port), str(seconds)], stdout=subprocess.PIPE, text=True, cwd="/",
        user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
    )  # fmt: skip
    proc.first = proc.stdout.readline().split()  # type: ignore[attr-defined]
    return proc


def test_no_key_is_sent_to_a_listener_of_another_user(tmp_path):
    """The hostile check of the second review: a local user who listens on the management port (while the
    guard is down) was sent the management key by the tools, and used it to register through the guard."""
    if service_user_can_run_here():
        cannot_run(service_user_can_run_here())
    ts = TorchServe(workdir=str(tmp_path / "ts"), model_store=str(tmp_path), ports=Ports.free())
    squatter = squat("nobody", ts.ports.management)
    assert squatter.first == ["listening"]
    with pytest.raises(
        ServerError, match=rf"port {ts.ports.management} \(management\) is held by .* uid 65534"
    ):
        ts.request("GET", "management", "/models")
    with pytest.raises(ServerError, match="no key was sent"):
        ts.refresh_token("inference")
    out, _ = squatter.communicate(timeout=30)
    # was: a GET /models with "Authorization: Bearer <management key>"
    assert out.split() == [
        "received",
        "0",
    ]


def test_grpc_management_answers_root_and_the_service_user_only(service_server):
    ts = service_server
    # Issue 25 finding 3: gRPC management registers any model directory for a key holder, past the guard.
    assert connect_as("nobody", ts.ports.grpc_management) == 111  # ECONNREFUSED; was 0: connected
    assert connect_as("nobody", ts.ports.inference) == 0  # the rule is about registering ports alone
    assert connect_as(settings.SERVICE_USER, ts.ports.grpc_management) == 0
    with socket.create_connection(("127.0.0.1", ts.ports.grpc_management), timeout=30):
        pass  # root
    assert ts.request("GET", "management", "/models").status_code == 200  # through the guard, as before


def guard_processes(ts) -> list[psutil.Process]:
    """The guard (not its supervisor) of `ts`, found by its command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd[1:3] == ["-m", "deploy.guard"] and ts.management_socket in cmd:
            found.append(proc)
    return found


def management_answers(ts, within: float = 60) -> bool:
    deadline = time.monotonic() + within  # a deadline to give up, not a timing assertion
    while time.monotonic() < deadline:
        try:
            if ts.request("GET", "management", "/models", timeout=10).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


def test_a_killed_guard_comes_back(service_server, capsys):
    from deploy import guard
    from deploy.serve import print_status

    ts = service_server
    (first,) = guard_processes(ts)
    first.kill()
    first.wait(30)
    # Between the guard's death and its restart the port stays held (the supervisor keeps the socket root
    # bound): another user cannot listen there and be sent the management key.
    squatter = squat("nobody", ts.ports.management)
    # was: listening (the guard's port was free for 1 s)
    assert squatter.first[0] == "refused", squatter.first
    squatter.wait(30)
    # Issue 29 item 9: inference went on, the management port stayed dead and nothing restarted the guard.
    assert management_answers(ts), "the management port is dead after the guard was killed"
    assert [p.pid for p in guard_processes(ts)] != [first.pid]
    # Its supervisor killed too: `status` says what is down (was a traceback), `start` relaunches the guard
    # alone (was "already running").
    supervisors, guards = guard.processes(ts)
    for proc in supervisors + guards:
        proc.kill()
    psutil.wait_procs(supervisors + guards, timeout=30)
    capsys.readouterr()
    print_status(ts)
    status = capsys.readouterr().out
    assert "TorchServe is running" in status and "management guard: DOWN" in status, status
    squatter = squat("nobody", ts.ports.management, seconds=3)  # took the port while nothing held it
    assert squatter.first == ["listening"]
    with pytest.raises(ServerError, match="cannot listen on .* for the management guard"):
        ts.start()  # was: the guard could not bind, and wait_ready sent the squatter the management key
    out, _ = squatter.communicate(timeout=30)
    assert out.split() == ["received", "0"]
    info = ts.start()
    assert info["relaunched"] == ["guard"] and guard.state(ts) == "running"
    assert management_answers(ts, within=5)


def test_stop_kills_a_frozen_guard(service_server):
    (frozen,) = guard_processes(service_server)
    frozen.suspend()  # SIGSTOP: SIGTERM waits until it is continued; it still holds the management port
    try:
        service_server.stop()
        assert not frozen.is_running() or frozen.status() == psutil.STATUS_ZOMBIE
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, never past a listener
            # free again; was held by the stopped guard
            s.bind(("127.0.0.1", service_server.ports.management))
    finally:
        if frozen.is_running():
            frozen.kill()


def as_service_user(*cmd: str):
    entry = pwd.getpwnam(settings.SERVICE_USER)
    subprocess.run(
        cmd, check=True, timeout=60, cwd="/", user=entry.pw_uid, group=entry.pw_gid, extra_groups=[]
    )


def fingerprint(*paths: str) -> list[tuple]:
    """Owner, group, mode and content of files (and folders, without content)."""
    found = []
    for path in paths:
        st = os.lstat(path)
        found.append((path, st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))))
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                found.append(f.read())
    return found


def test_root_never_follows_the_service_users_links(archive_factory, digits, png):
    """Issue 25 finding 4: the service user plants links in every folder it can write, pointing at a
    root-owned 0600 file (and the folder holding it); start and stop as root leave that file as it was."""
    if service_user_can_run_here():
        cannot_run(service_user_can_run_here())
    base = tempfile.mkdtemp(prefix="ts-user-")
    decoy = None
    try:
        ts = service_server_in(base, archive_factory)
        secret_dir = os.path.join(base, "secret")
        os.mkdir(secret_dir, 0o700)
        secret = os.path.join(secret_dir, "secret.txt")
        with open(secret, "w") as f:
            f.write("root's alone\n")
        os.chmod(secret, 0o600)
        before = fingerprint(secret, secret_dir)
        uid = pwd.getpwnam(settings.SERVICE_USER).pw_uid
        writable = [d for d, _, _ in os.walk(ts.workdir) if os.stat(d).st_uid == uid]
        assert writable
        logs = ("torchserve.out", "guard.log")  # root appended to these
        for folder in writable:
            # make_private's walk chowned
            as_service_user("ln", "-s", secret_dir, os.path.join(folder, "evil"))
            for name in ("generated.config.properties", "guard.pid", *logs):  # written through by root
                as_service_user("ln", "-sf", secret, os.path.join(folder, name))
        try:  # the service user's own logs lead nowhere it can write: TorchServe may not start; nothing else
            ts.start()
        except (subprocess.CalledProcessError, RuntimeError):
            pass
        ts.stop()
        # was: the service user's, the config written into it
        assert fingerprint(secret, secret_dir) == before
        for folder in writable:
            for name in logs:
                as_service_user("rm", "-f", os.path.join(folder, name))
        ts.start()
        assert ts.request("POST", "inference", "/predictions/my_model", data=png).status_code == 200
        ts.stop()
        assert fingerprint(secret, secret_dir) == before
        # A pid file names a root process that looks like TorchServe and the guard: root signals none of it.
        decoy = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time; time.sleep(600)",
                "org.pytorch.serve.ModelServer",
                "deploy.guard",
            ]
            + ["-m", "deploy.guard", ts.management_socket]
        )
        for pid_file in (ts.pid_file, os.path.join(os.path.dirname(ts.pid_file), "guard.pid")):
            as_service_user("sh", "-c", f'rm -f "$0" && echo {decoy.pid} > "$0"', pid_file)
        assert not ts.is_running()
        ts.stop()
        assert decoy.poll() is None, "root stopped a process that the service user's pid file named"
    finally:
        if decoy is not None:
            decoy.kill()
            decoy.wait()
        shutil.rmtree(base, ignore_errors=True)


def test_model_store_and_runs_are_for_root_and_the_service_group(checkpoint, tmp_path):
    """Issue 25 (low): model_store/ and runs/ were world-readable: any local user copied the models."""
    from deploy.archive import archive_checkpoint
    from train.checkpoint import check_output_dir

    store, runs = tmp_path / "model_store", tmp_path / "runs"
    archive_checkpoint(checkpoint, "1.0", "eager", output=str(store / "my_model.mar"))
    check_output_dir(argparse.Namespace(output_dir=str(runs / "default"), resume=None))
    assert {oct(stat.S_IMODE(d.stat().st_mode)) for d in (store, runs)} == {"0o750"}  # was 0o755
    if not service_user_can_run_here():
        assert store.stat().st_gid == pwd.getpwnam(settings.SERVICE_USER).pw_gid  # the server reads it


def test_an_earlier_layout_is_taken_back_without_following_links(tmp_path):
    """The folder an earlier version gave wholly to the service user: root takes the folder back, moves
    TorchServe's logs and snapshots into home/ and copies the deployment history into a state/ of its own."""
    if service_user_can_run_here():
        cannot_run(service_user_can_run_here())
    ts = TorchServe(workdir=str(tmp_path / "ts"), model_store=str(tmp_path), ports=Ports(1, 2, 3, 4, 5))
    secret = tmp_path / "secret.txt"
    secret.write_text("root's alone\n")
    os.makedirs(ts.path("logs", "config"))
    (tmp_path / "ts" / "logs" / "config" / "snapshot.cfg").write_text("model_snapshot={}\n")
    os.makedirs(ts.path("state"))
    (tmp_path / "ts" / "state" / "deployments.jsonl").write_text('{"model": "my_model"}\n')
    os.symlink(secret, ts.path("state", "planted.jsonl"))
    entry = pwd.getpwnam(settings.SERVICE_USER)
    for folder, dirs, files in os.walk(ts.workdir):
        for name in [folder, *[os.path.join(folder, n) for n in dirs + files]]:
            os.lchown(name, entry.pw_uid, entry.pw_gid)
    ts.prepare_dirs()
    assert os.stat(ts.workdir).st_uid == 0 and os.stat(ts.path("state")).st_uid == 0
    assert os.path.isfile(os.path.join(ts.log_dir, "config", "snapshot.cfg"))  # restores find it
    assert open(ts.path("state", "deployments.jsonl")).read() == '{"model": "my_model"}\n'
    assert os.stat(ts.path("state", "deployments.jsonl")).st_uid == 0
    assert not os.path.lexists(ts.path("state", "planted.jsonl"))
    assert secret.stat().st_uid == 0 and secret.read_text() == "root's alone\n"
