"""Shipping versions safely against a real TorchServe 0.12: tokens and their refresh, allowed URLs, archive
integrity, the promotion gate, rollback, unregistering, restarts and the no-token development mode.

The module shares one TorchServe (`server`, from conftest: my_model 1.0, eager) and the tests run in file
order, each leaving a known state for the next:

    tokens, allowed URLs, integrity      1.0 (default) only
    gate: bad 3.0 rejected, 2.0 dry run  1.0 (default) only
    gate: other classes 4.0 refused;     1.0 (default) only  (textures 1.0 registered beside it, then
                                                             unregistered)
      the same as model "textures"
    gate: a 3<->8 swapped 9.0 refused    1.0 (default) only
    gate: 2.0 promoted, rollback, back   1.0, 2.0 (default)
    restart, rollback after the restart  1.0 (default), 2.0
    restart with 1.0's archive deleted   2.0 (default)  -> 1.0 registered and unregistered again

Two more servers have their own workdirs: one with 3-second tokens, one in development mode (no tokens).
"""

import datetime
import http.server
import json
import os
import shutil
import threading
import time
import zipfile
from urllib.parse import urlencode

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from deploy import gate as gatelib
from deploy import management, register_version, versions
from deploy.archive import read_classes, write_checksum
from deploy.guard import UnixHTTPConnection
from deploy.serve import print_status
from deploy.server import Ports, ServerError, TorchServe
from model_src import manifest as bundle_manifest
from tests import images
from tests.conftest import install_archive, served_version, train_run

# One server for the module: registrations, promotions, rollbacks and restarts build on each other.
pytestmark = [pytest.mark.slow, pytest.mark.torchserve, pytest.mark.in_order]

INVALID_KEY = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"


def answers(ts, png, version=None):
    path = "/predictions/my_model" + (f"/{version}" if version else "")
    return ts.request("POST", "inference", path, data=png).status_code


def registered(ts):
    return {v["modelVersion"] for v in management.versions(ts, "my_model")}


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def register_args(archive, golden, report, **kw):
    """What register_version.main() builds for `register ARCHIVE --promote --golden GOLDEN --report REPORT`,
    with `kw` replacing any of its values (dry_run=True, allow_new_classes=True...)."""
    argv = ["register", str(archive), "--promote", "--golden", str(golden), "--report", str(report)]
    args = register_version.get_args_parser().parse_args(argv)
    for key, value in kw.items():
        assert hasattr(args, key), key
        setattr(args, key, value)
    return args


def expires(entry):
    """key_file.json 'expiration time' (Java Instant, nanoseconds, Z) -> POSIX seconds."""
    whole, _, frac = entry["expiration time"].rstrip("Z").partition(".")
    stamp = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC).timestamp()
    return stamp + float("0." + (frac or "0"))


# --- tokens -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "api,method,path",
    [
        ("inference", "POST", "/predictions/my_model"),
        ("inference", "GET", "/ping"),
        ("management", "GET", "/models"),
        ("management", "POST", "/models?url=my_model.mar"),
        ("management", "DELETE", "/models/my_model/1.0"),
        ("management", "GET", "/token?type=management"),
    ],
)
def test_calls_without_or_with_a_wrong_token_are_refused(server, api, method, path):
    for headers in (
        {},
        bearer("not-the-key"),
        {"Authorization": server.keys()["inference"]["key"]},  # no Bearer
    ):
        resp = requests.request(method, server.url(api) + path, headers=headers, timeout=30)
        assert resp.status_code == 400, (headers, resp.text)
        assert resp.json()["type"] == "InvalidKeyException", resp.text
    assert registered(server) == {"1.0"}  # the refused DELETE did nothing


def test_each_key_opens_only_its_own_api(server, png):
    keys = server.keys()
    assert oct(os.stat(server.key_file).st_mode & 0o777) == "0o600"  # TorchServe writes it owner-only
    assert len({keys[k]["key"] for k in ("inference", "management", "API")}) == 3
    management = lambda key: requests.get(
        server.url("management") + "/models", headers=bearer(key), timeout=30
    )
    inference = lambda key: requests.get(server.url() + "/ping", headers=bearer(key), timeout=30)
    assert management(keys["management"]["key"]).status_code == 200
    assert inference(keys["inference"]["key"]).status_code == 200
    assert answers(server, png) == 200
    for wrong in (management(keys["inference"]["key"]), management(keys["API"]["key"])):
        assert wrong.status_code == 400 and wrong.json()["message"] == INVALID_KEY
    for wrong in (inference(keys["management"]["key"]), inference(keys["API"]["key"])):
        assert wrong.status_code == 400 and wrong.json()["message"] == INVALID_KEY


def test_management_token_refresh_rewrites_only_that_key(server, png):
    before = server.keys()
    time.sleep(1.1)  # so that the new expiry is visibly later
    server.refresh_token("management")  # GET /token?type=management with the API key: 200, empty body
    after = server.keys()  # re-read: TorchServe rewrote key_file.json in place
    assert after["management"]["key"] != before["management"]["key"]
    assert expires(after["management"]) > expires(before["management"])
    assert after["inference"] == before["inference"] and after["API"] == before["API"]
    assert oct(os.stat(server.key_file).st_mode & 0o777) == "0o600"
    url = server.url("management") + "/models"
    assert requests.get(url, headers=bearer(after["management"]["key"]), timeout=30).status_code == 200
    old = requests.get(url, headers=bearer(before["management"]["key"]), timeout=30)
    # the old key is dead at once
    assert old.status_code == 400 and old.json()["type"] == "InvalidKeyException"
    # the tools read key_file.json on every call, so they keep working
    assert management.default_version(server, "my_model") == "1.0" and registered(server) == {"1.0"}
    assert answers(server, png) == 200


def test_inference_token_refresh_and_what_refresh_needs(server, png):
    before = server.keys()
    server.refresh_token("inference")
    after = server.keys()
    assert (
        after["inference"]["key"] != before["inference"]["key"]
        and after["management"] == before["management"]
    )
    predict = server.url() + "/predictions/my_model"
    assert (
        requests.post(predict, data=png, headers=bearer(before["inference"]["key"]), timeout=30).status_code
        == 400
    )
    assert (
        requests.post(predict, data=png, headers=bearer(after["inference"]["key"]), timeout=30).status_code
        == 200
    )
    assert answers(server, png) == 200
    # only the API key may refresh, and only the two known types
    token = server.url("management") + "/token?type=management"
    assert requests.get(token, headers=bearer(after["management"]["key"]), timeout=30).status_code == 400
    with pytest.raises(ServerError, match="could not refresh the bogus token"):
        server.refresh_token("bogus")
    assert server.keys()["management"] == after["management"]


def test_expired_keys_are_refreshed_by_the_tools(store, torchserve_factory, png):
    # 0.05 min = 3 s: start-up alone outlasts it, so start() itself must refresh while it waits
    ts = torchserve_factory(store, overrides={"token_expiration_min": "0.05"})
    try:
        keys = ts.keys()
        time.sleep(max(0.0, max(expires(keys["inference"]), expires(keys["management"])) - time.time()) + 0.5)
        stale = requests.get(
            ts.url("management") + "/models", headers=bearer(keys["management"]["key"]), timeout=30
        )
        assert stale.status_code == 400 and stale.json()["message"] == INVALID_KEY
        assert answers(ts, png) == 200  # request(): 400, GET /token?type=inference, retry
        assert management.default_version(ts, "my_model") == "1.0"
        fresh = ts.keys()
        assert fresh["inference"]["key"] != keys["inference"]["key"]
        assert fresh["management"]["key"] != keys["management"]["key"]
        assert fresh["API"] == keys["API"]
    finally:
        ts.stop()


# --- what the management API may load -----------------------------------------------------------------------


class CountingServer(http.server.HTTPServer):
    """Serves a real .mar for any path and counts every connection it accepts."""

    def __init__(self, payload):
        super().__init__(("127.0.0.1", 0), CountingHandler)
        self.payload, self.connections = payload, 0

    def process_request(self, request, client_address):
        self.connections += 1
        super().process_request(request, client_address)


class CountingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.payload)))
        self.end_headers()
        self.wfile.write(self.server.payload)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def behind_the_guard(ts, method, path):
    """A call to TorchServe's own management API (its Unix socket), past deploy/guard.py."""
    conn = UnixHTTPConnection(ts.management_socket, timeout=60)
    try:
        conn.request(method, path, headers=ts.auth("management"))
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def test_urls_outside_the_model_store_are_refused_without_any_download(
    server, archive_factory, png, tmp_path
):
    # a loadable .mar
    outside = install_archive(archive_factory("2.0", backend="onnx"), tmp_path, "outside.mar")
    with open(outside, "rb") as f:
        httpd = CountingServer(f.read())
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_port
    refused = {
        f"http://127.0.0.1:{port}/x.mar": "does not match any allowed URL(s)",
        f"http://127.0.0.1:{port}/my_model_v2.0.mar": "does not match any allowed URL(s)",
        "https://example.com/my_model.mar": "does not match any allowed URL(s)",
        "file:///etc/passwd": "does not match any allowed URL(s)",
        f"file://{outside}": "does not match any allowed URL(s)",
        outside: "Model not found at",  # an absolute path is looked up in the store only
        "../x.mar": "Relative path is not allowed in url",
        f"../{os.path.basename(tmp_path)}/outside.mar": "Relative path is not allowed in url",
        "sub/../../outside.mar": "Relative path is not allowed in url",
    }
    try:
        for url, message in refused.items():
            resp = server.request("POST", "management", "/models", params={"url": url, "synchronous": "true"})
            assert resp.status_code == 403, (url, resp.text)  # the guard on the management port
            # ...and TorchServe itself, behind it (what the literal `torchserve --start` exposes): 0.12
            # answers all of these 404 ModelNotFoundException
            status, body = behind_the_guard(
                server, "POST", "/models?" + urlencode({"url": url, "synchronous": "true"})
            )
            assert status == 404, (url, body)
            assert message in body["message"], (url, body)
        assert httpd.connections == 0  # TorchServe never even connected
        assert requests.get(f"http://127.0.0.1:{port}/probe", timeout=10).status_code == 200
        assert httpd.connections == 1  # ...and the counter does count
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert registered(server) == {"1.0"}
    assert answers(server, png) == 200


# --- archive integrity --------------------------------------------------------------------------------------


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def truncate_half(src, dst):
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: len(data) // 2])
    return dst


def test_register_refuses_bad_archives_before_torchserve_sees_them(server, store, archive_factory, tmp_path):
    # A version not registered yet: the client reads only the manifest (name, version, already registered?)
    # and leaves the hash and the zip test to the guard, which refuses the archive before TorchServe sees it.
    good = archive_factory("2.0", backend="onnx")

    tampered = install_archive(good, store, "tampered.mar")  # checksum written, then one byte changes
    flip_byte(tampered, os.path.getsize(tampered) // 2)
    with pytest.raises(
        management.DeployError, match=r"tampered.mar: SHA-256 .* does not match .* changed after it"
    ):
        versions.register(server, tampered)

    unsigned = install_archive(good, store, "unsigned.mar")
    os.remove(unsigned + ".sha256")
    with pytest.raises(management.DeployError, match=r"unsigned.mar.sha256 is missing"):
        versions.register(server, unsigned)

    truncated = truncate_half(good, os.path.join(store, "truncated.mar"))
    write_checksum(truncated)  # the checksum matches: only the zip check can catch it
    with pytest.raises(
        management.DeployError, match=r"truncated.mar is not a valid .mar \(truncated or corrupt zip"
    ):
        versions.register(server, truncated)

    # a broken deflate stream (first byte 0xFF: reserved block type) with a matching checksum:
    # zipfile.testzip() lets zlib.error through, read_manifest must still turn it into a DeployError
    broken = install_archive(good, store, "broken.mar")
    with zipfile.ZipFile(broken) as z:
        info = z.getinfo("MAR-INF/MANIFEST.json")
    with open(broken, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        f.write(b"\xff")
    write_checksum(broken)
    with pytest.raises(management.DeployError, match=r"broken.mar is not a valid .mar"):
        versions.register(server, broken)

    elsewhere = install_archive(good, tmp_path, "my_model.mar")
    with pytest.raises(
        management.DeployError, match=r"is not in the model store .*only archives there can be registered"
    ):
        versions.register(server, elsewhere)
    with pytest.raises(management.DeployError, match="does not exist"):
        versions.register(server, os.path.join(store, "nowhere.mar"))
    with pytest.raises(management.DeployError, match="my_model 1.0 is already registered"):
        versions.register(server, os.path.join(store, "my_model.mar"))
    with pytest.raises(management.DeployError, match="my_model.mar holds model 'my_model', not 'imagenet'"):
        # was: --model ignored
        versions.register(server, os.path.join(store, "my_model.mar"), model="imagenet")

    assert registered(server) == {"1.0"}


def test_a_truncated_archive_sent_straight_to_torchserve_leaves_serving_alone(server, store, png):
    truncate_half(os.path.join(store, "my_model.mar"), os.path.join(store, "half.mar"))
    resp = server.request("POST", "management", "/models?url=half.mar&initial_workers=1&synchronous=true")
    assert resp.status_code == 403 and "half.mar.sha256 is missing" in resp.json()["message"]  # the guard
    # past the guard, TorchServe 0.12 itself: 500 InternalServerException "Failed to save model: half.mar"
    status, body = behind_the_guard(server, "POST", "/models?url=half.mar&initial_workers=1&synchronous=true")
    assert status == 500, body
    assert body["type"] == "InternalServerException" and "half.mar" in body["message"]
    duplicate = server.request("POST", "management", "/models?url=my_model.mar&synchronous=true")
    assert duplicate.status_code == 409, duplicate.text  # and an existing version is not replaced
    assert registered(server) == {"1.0"} and management.default_version(server, "my_model") == "1.0"
    assert answers(server, png) == 200
    ping = server.request("GET", "inference", "/ping")
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"


# --- the promotion gate -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_checkpoint(tmp_path_factory, digits):
    """One epoch on 60 images at a learning rate that barely moves: close to chance."""
    out = train_run(
        tmp_path_factory.mktemp("bad") / "run", "--epochs", 1, "--limit-samples", 60, "--lr", 1e-5
    )
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["best_val_acc"] < 0.5
    return os.path.join(out, "checkpoint_last.pt")


@pytest.fixture(scope="module")
def golden(trained):
    return os.path.join(trained, "golden")


def test_gate_rejects_a_bad_model(server, store, archive_factory, bad_checkpoint, golden, tmp_path, png):
    path = install_archive(archive_factory("3.0", ckpt=bad_checkpoint), store, "my_model_v3.0.mar")
    report_path = tmp_path / "gate.json"
    assert (
        register_version.cmd_register(server, register_args(path, golden, report_path))
        == versions.EXIT_REJECTED
    )
    with open(report_path) as f:
        report = json.load(f)
    assert report["passed"] is False and report["images"] == 100
    assert report["candidate"]["version"] == "3.0" and report["baseline"]["version"] == "1.0"
    assert report["candidate"]["accuracy"] < 0.5 < 0.9 < report["baseline"]["accuracy"]
    assert report["candidate"]["errors"] == report["baseline"]["errors"] == 0
    assert "over the allowed 1.00" in report["reason"]
    assert management.default_version(server, "my_model") == "1.0"
    assert registered(server) == {"1.0"}  # the rejected version was unregistered again
    assert versions.history(server) == []  # nothing was promoted
    assert answers(server, png) == 200


def test_gate_dry_run_reports_and_changes_nothing(server, store, archive_factory, golden, tmp_path):
    path = install_archive(archive_factory("2.0", backend="onnx"), store, "my_model_v2.0.mar")
    args = register_args(path, golden, tmp_path / "dry.json", promote=False, dry_run=True)
    assert register_version.cmd_register(server, args) == 0
    with open(tmp_path / "dry.json") as f:
        report = json.load(f)
    assert report["passed"] is True and report["candidate"]["version"] == "2.0"
    assert report["candidate"]["accuracy"] > 0.9 and report["baseline"]["accuracy"] > 0.9
    assert management.default_version(server, "my_model") == "1.0"
    assert registered(server) == {"1.0"}  # 2.0 was unregistered after the report
    assert versions.history(server) == []


def test_a_gate_that_cannot_finish_leaves_nothing_registered(
    server, store, archive_factory, golden, tmp_path, monkeypatch
):
    path = install_archive(archive_factory("2.0", backend="onnx"), store, "my_model_v2.0.mar")
    missing = register_args(path, str(tmp_path / "no-golden"), tmp_path / "gate.json")
    with pytest.raises(management.DeployError, match="no golden set at"):
        register_version.cmd_register(server, missing)  # read before registering: nothing to clean up
    assert registered(server) == {"1.0"}

    def interrupted(*args):  # Ctrl-C (or a request error) while the golden set is being scored
        raise KeyboardInterrupt

    monkeypatch.setattr(gatelib, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        register_version.cmd_register(server, register_args(path, golden, tmp_path / "gate.json"))
    assert registered(server) == {"1.0"}  # unregistered again, so that a retry can register it
    assert management.default_version(server, "my_model") == "1.0" and versions.history(server) == []


# --- another model: other classes make a new model name, not a new version ----------------------------------

TEXTURES = ("brick", "grass", "gravel")


def texture(name: str, rng) -> Image.Image:
    """A 16x16 RGB crop: brick = red courses with mortar lines, grass = green blades, gravel = grey
    speckle."""
    noise = rng.integers(-20, 21, (16, 16, 3))
    if name == "brick":
        arr = np.full((16, 16, 3), (150, 60, 40)) + noise
        arr[::4] = 200  # mortar
    elif name == "grass":
        arr = np.full((16, 16, 3), (40, 140, 40)) + noise
        arr[:, ::3] = (20, 90, 20)  # blades
    else:
        arr = rng.integers(80, 180, (16, 16, 1)).repeat(3, axis=2)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    """A run on 3 classes of synthetic texture crops (one epoch, ~2 s): a classifier of other classes than the
    digits, as a new user would train on their own images. Returns (checkpoint, golden dir)."""
    root = tmp_path_factory.mktemp("textures")
    rng = np.random.default_rng(0)
    for split, count in (("train", 30), ("val", 10)):
        for name in TEXTURES:
            (root / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                texture(name, rng).save(root / "data" / split / name / f"{i:03d}.png")
    run = train_run(root / "run", "--data", root / "data", "--epochs", 1)
    return os.path.join(run, "checkpoint_last.pt"), os.path.join(run, "golden")


def test_gate_refuses_a_version_that_answers_other_classes(
    server, store, archive_factory, textures, tmp_path, capsys
):
    checkpoint, golden = textures  # its own golden set, where the digits default scores 0
    path = install_archive(archive_factory("4.0", ckpt=checkpoint), store, "my_model_v4.0.mar")
    assert read_classes(path) == list(TEXTURES)
    own = {"golden_from_candidate": True}  # not my_model's set: gated on only when asked for
    for dry_run in (False, True):
        args = register_args(
            path, golden, tmp_path / "gate.json", dry_run=dry_run, promote=not dry_run, **own
        )
        capsys.readouterr()
        assert register_version.cmd_register(server, args) == versions.EXIT_REJECTED
        out = capsys.readouterr().out
        with open(tmp_path / "gate.json") as f:
            report = json.load(f)
        assert report["passed"] is False and report["classes"]["same"] is False
        assert report["classes"]["added"] == list(TEXTURES) and len(report["classes"]["missing"]) == 10
        assert "accuracy" not in report["candidate"]  # refused before any golden image was sent
        diff = "3 classes vs the default's 10; new: brick, grass, gravel; gone: 0, 1, 2, 3 and 6 more"
        assert diff in report["reason"]
        assert (
            gatelib.NEW_MODEL in report["reason"] and gatelib.NEW_MODEL in out and "--model-name NAME" in out
        )
        assert management.default_version(server, "my_model") == "1.0" and registered(server) == {"1.0"}
        assert versions.history(server) == []

    # the overrides pass the class check, and the agreement check that follows (dry run: the state stays as it
    # was)
    overrides = {"allow_new_classes": True, "allow_disagreement": True}
    args = register_args(
        path, golden, tmp_path / "gate.json", dry_run=True, promote=False, **own, **overrides
    )
    assert register_version.cmd_register(server, args) == 0
    with open(tmp_path / "gate.json") as f:
        report = json.load(f)
    assert report["passed"] is True and report["classes"]["overridden"] is True
    assert report["baseline"]["accuracy"] == 0.0 and report["images"] == 30  # why the class check exists
    assert (
        "class check overridden by --allow-new-classes" in report["reason"]
        and gatelib.NEW_MODEL in report["reason"]
    )
    assert management.default_version(server, "my_model") == "1.0" and registered(server) == {"1.0"}
    assert versions.history(server) == []


def test_other_classes_serve_beside_my_model_under_their_own_name(
    server, store, archive_factory, textures, png, monkeypatch, capsys
):
    checkpoint, golden = textures
    path = install_archive(
        archive_factory("1.0", ckpt=checkpoint, model_name="textures"), store, "textures.mar"
    )
    with pytest.raises(management.DeployError, match="holds model 'textures', not 'my_model'"):
        versions.register(server, path, model="my_model")
    args = register_args(path, golden, os.devnull)
    # the first version of a model is default by itself
    assert register_version.cmd_register(server, args) == 0
    assert "textures 1.0 is the only version and already default" in capsys.readouterr().out
    assert management.default_version(server, "textures") == "1.0"
    assert management.default_version(server, "my_model") == "1.0" and registered(server) == {"1.0"}

    crop = images.encode(texture("grass", np.random.default_rng(1)), "PNG")
    for model, body, labels in (("textures", crop, set(TEXTURES)), ("my_model", png, set("0123456789"))):
        resp = server.request("POST", "inference", f"/predictions/{model}", data=body)
        assert resp.status_code == 200 and set(resp.json()) <= labels, (model, resp.text)

    monkeypatch.setattr(register_version, "TorchServe", lambda: server)  # the CLI, against this test's server
    capsys.readouterr()
    assert register_version.main(["list", "--model", "textures"]) == 0
    assert register_version.main(["list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in listed] == [
        ["textures", "1.0", "default"],
        ["my_model", "1.0", "default"],
    ]
    assert register_version.main(["unregister", "1.0", "--model", "textures"]) == 0
    assert management.model_names(server) == ["my_model"]
    assert registered(server) == {"1.0"} and management.default_version(server, "my_model") == "1.0"


SWAP = {"3": "8", "8": "3"}


def swapped(store, golden, out):
    """my_model 9.0 as if trained with the folders of 3 and 8 swapped (1.0's build, its labels for 3 and 8
    exchanged: the same ten classes), and the golden set its run would have written."""
    src, path = os.path.join(store, "my_model.mar"), os.path.join(store, "my_model_v9.0.mar")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                mar = json.loads(data)
                mar["model"]["modelVersion"] = "9.0"
                data = json.dumps(mar).encode()
            elif item.filename == bundle_manifest.FILE:
                bundle = bundle_manifest.loads(data)
                bundle.class_names = [SWAP.get(name, name) for name in bundle.class_names]
                data = json.dumps(bundle.to_dict()).encode()
            zout.writestr(item, data)
    write_checksum(path)
    shutil.copytree(golden, out)
    with open(os.path.join(golden, "golden.json")) as f:
        entries = [{**e, "label": SWAP.get(e["label"], e["label"])} for e in json.load(f)]
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(entries, f)
    return path, str(out)


def test_gate_refuses_a_3_8_swapped_candidate_on_either_golden_set(server, store, golden, tmp_path):
    path, own = swapped(store, golden, tmp_path / "swapped-golden")
    report_path = tmp_path / "gate.json"

    def gate(golden_dir, **kw):
        rc = register_version.cmd_register(server, register_args(path, golden_dir, report_path, **kw))
        with open(report_path) as f:
            return rc, json.load(f)

    # the model's set (fixed by the first gate of my_model, from this same folder)
    rc, model_set = gate(golden)
    assert rc == versions.EXIT_REJECTED
    assert model_set["candidate"]["accuracy"] < model_set["baseline"]["accuracy"] - 0.15
    # issue 28's command line, --golden naming the candidate's own set: not my_model's, refused before
    # registering
    with pytest.raises(management.DeployError, match="is not my_model's golden set"):
        gate(own)
    assert model_set["golden"]["source"] in ("model", "fixed")
    # its own set: it scores higher there, and still disagrees
    rc, report = gate(own, golden_from_candidate=True)
    assert rc == versions.EXIT_REJECTED and report["candidate"]["accuracy"] > report["baseline"]["accuracy"]
    assert report["agreement"] < 0.85 and "is below 90%" in report["reason"]
    rc, report = gate(own, golden_from_candidate=True, allow_disagreement=True, dry_run=True, promote=False)
    assert rc == 0 and report["passed"] is True
    assert "--golden-from-candidate" in report["reason"] and "--allow-disagreement" in report["reason"]
    assert management.default_version(server, "my_model") == "1.0" and registered(server) == {"1.0"}
    assert versions.history(server) == []
    for leftover in (path, path + ".sha256"):
        os.remove(leftover)


def test_rollback_needs_history(server):
    with pytest.raises(
        management.DeployError, match="no earlier default of my_model to roll back to from 1.0"
    ):
        versions.rollback(server, "my_model")
    with pytest.raises(management.DeployError, match="not_a_model is not registered"):
        versions.rollback(server, "not_a_model")


def test_gate_promotes_a_good_model_and_rollback_undoes_it(server, store, golden, tmp_path, png):
    path = os.path.join(store, "my_model_v2.0.mar")  # same good checkpoint as 1.0, exported to ONNX
    assert register_version.cmd_register(server, register_args(path, golden, tmp_path / "gate.json")) == 0
    with open(tmp_path / "gate.json") as f:
        report = json.load(f)
    assert report["passed"] is True and report["agreement"] > 0.95
    assert report["candidate"]["accuracy"] == pytest.approx(report["baseline"]["accuracy"], abs=0.02)
    assert management.default_version(server, "my_model") == "2.0" and registered(server) == {"1.0", "2.0"}
    assert served_version(server, png) == "2.0"  # the answer says so too, not only the management API
    (entry,) = versions.history(server)
    assert (entry["version"], entry["previous"]) == ("2.0", "1.0") and entry["reason"].startswith(
        "gate passed"
    )

    assert versions.rollback(server, "my_model") == ("2.0", "1.0")
    assert management.default_version(server, "my_model") == "1.0"
    assert answers(server, png) == answers(server, png, "1.0") == answers(server, png, "2.0") == 200
    assert served_version(server, png) == "1.0"
    assert versions.rollback(server, "my_model") == ("1.0", "2.0")  # rollback of the rollback
    assert management.default_version(server, "my_model") == "2.0"
    assert served_version(server, png) == "2.0"
    assert [e["version"] for e in versions.history(server)] == ["2.0", "1.0", "2.0"]


def test_the_default_cannot_be_unregistered_while_others_exist(server, png):
    with pytest.raises(
        management.DeployError, match="my_model 2.0 is the default version; set another default first"
    ):
        versions.unregister(server, "my_model", "2.0")
    raw = server.request("DELETE", "management", "/models/my_model/2.0")
    assert raw.status_code == 403, raw.text  # TorchServe refuses too
    with pytest.raises(management.DeployError, match="my_model 9.9 is not registered"):
        versions.unregister(server, "my_model", "9.9")
    assert registered(server) == {"1.0", "2.0"} and management.default_version(server, "my_model") == "2.0"
    assert answers(server, png) == 200


# --- restarts -----------------------------------------------------------------------------------------------


def test_restart_keeps_versions_and_default(server, png):
    server.stop()
    assert not server.is_running() and not os.path.exists(server.key_file)  # TorchServe deletes the key file
    info = server.start()
    assert info["restored"] is True
    assert set(info["models"]) == {"my_model"}
    assert registered(server) == {"1.0", "2.0"} and management.default_version(server, "my_model") == "2.0"
    assert answers(server, png, "1.0") == answers(server, png, "2.0") == answers(server, png) == 200
    assert served_version(server, png) == "2.0"
    # the promotion history lives in the workdir too: rollback still works after the restart
    assert versions.rollback(server, "my_model") == ("2.0", "1.0")
    assert management.default_version(server, "my_model") == "1.0"
    assert served_version(server, png) == "1.0"


def test_restart_skips_a_version_whose_archive_was_deleted(server, store, png, caplog):
    mar = os.path.join(store, "my_model.mar")  # the archive of the default, 1.0
    server.stop()
    shutil.move(mar, mar + ".away")
    try:
        caplog.clear()
        info = server.start()
        assert "my_model 1.0: my_model.mar is no longer in the model store; not restoring it" in caplog.text
        assert info["restored"] is True
        assert registered(server) == {"2.0"} and management.default_version(server, "my_model") == "2.0"
        assert answers(server, png) == answers(server, png, "2.0") == 200
    finally:
        shutil.move(mar + ".away", mar)


def test_a_non_default_version_can_be_unregistered(server, store, png):
    # archive is back
    assert versions.register(server, os.path.join(store, "my_model.mar")) == (
        "my_model",
        "1.0",
    )
    assert management.default_version(server, "my_model") == "2.0"  # registering never changes the default
    versions.unregister(server, "my_model", "1.0")
    assert registered(server) == {"2.0"}
    assert answers(server, png) == 200


def test_a_start_that_never_gets_ready_leaves_nothing_running(store, tmp_path):
    ts = TorchServe(workdir=str(tmp_path / "ts"), model_store=str(store), ports=Ports.free(), user=None)
    try:
        with pytest.raises(ServerError, match="not ready after"):
            ts.start(timeout=0.5)  # the JVM alone takes longer than that
        assert not ts.is_running()  # stopped by start() itself: a second start would say "already running"
        ours = [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if ts.generated_config in (p.info["cmdline"] or [])
        ]
        assert ours == []
    finally:
        ts.stop()


# --- development mode ---------------------------------------------------------------------------------------


def test_no_token_mode_serves_without_keys_and_closes_the_model_api(store, torchserve_factory, png):
    # what scripts/serve.sh start --no-tokens does
    ts = torchserve_factory(
        store, overrides={"disable_token_authorization": "true", "enable_model_api": "false"}
    )
    try:
        assert not os.path.exists(ts.key_file) and ts.auth("inference") == {}
        assert requests.post(ts.url() + "/predictions/my_model", data=png, timeout=30).status_code == 200
        assert requests.get(ts.url() + "/ping", timeout=30).status_code == 200
        # reading is allowed
        assert requests.get(ts.url("management") + "/models", timeout=30).status_code == 200
        register = requests.post(ts.url("management") + "/models?url=my_model_v2.0.mar", timeout=30)
        assert register.status_code == 405, register.text
        delete = requests.delete(ts.url("management") + "/models/my_model/1.0", timeout=30)
        assert delete.status_code == 405, delete.text
        assert {v["modelVersion"] for v in management.versions(ts, "my_model")} == {"1.0"}
        # serve.sh status, register_version.sh list and deploy.predict know nothing of --no-tokens: they read
        # config.properties (tokens on) and must ask the running server instead
        plain = TorchServe(workdir=ts.workdir, model_store=ts.model_store, ports=ts.ports, user=None)
        assert plain.config()["disable_token_authorization"] == "false"
        assert plain.tokens_enabled is False and plain.auth("management") == {}
        assert {v["modelVersion"] for v in management.versions(plain, "my_model")} == {"1.0"}
        assert plain.request("POST", "inference", "/predictions/my_model", data=png).status_code == 200
        print_status(plain)  # raised "cannot read key_file.json: is TorchServe running with tokens on?"
    finally:
        ts.stop()
    plain.forget()  # what it read of the running server (done on start, stop and a refused key)
    assert plain.tokens_enabled is True  # stopped: back to config.properties
