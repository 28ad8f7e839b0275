"""Shipping versions safely against a real TorchServe: tokens, allowed URLs, archive integrity,
the promotion gate, rollback, unregistering, restarts and the no-token development mode."""

import argparse
import http.server
import json
import os
import threading

import pytest
import requests

from scripts import deploy
from scripts.archive import write_checksum
from tests.conftest import install_archive, train_run

pytestmark = [pytest.mark.slow, pytest.mark.torchserve]

VAL3 = os.path.join("data", "digits", "val", "3")


@pytest.fixture(scope="module")
def png(digits):
    return open(os.path.join(VAL3, sorted(os.listdir(VAL3))[0]), "rb").read()


@pytest.fixture(scope="module")
def store(tmp_path_factory, archive_factory):
    store = tmp_path_factory.mktemp("store")
    install_archive(archive_factory("1.0"), store, "my_model.mar")
    return store


@pytest.fixture(scope="module")
def server(store, torchserve_factory):
    return torchserve_factory(store)


def answers(ts, png, version=None):
    path = "/predictions/my_model" + (f"/{version}" if version else "")
    return ts.request("POST", "inference", path, data=png).status_code


def register_args(archive, golden, tmp_path, **kw):
    return argparse.Namespace(
        archive=archive,
        workers=1,
        promote=True,
        dry_run=False,
        golden=golden,
        max_accuracy_drop=1.0,
        report=str(tmp_path / "gate.json"),
        **kw,
    )


# --- tokens ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "api,method,path",
    [
        ("inference", "POST", "/predictions/my_model"),
        ("inference", "GET", "/ping"),
        ("management", "GET", "/models"),
        ("management", "POST", "/models?url=my_model.mar"),
    ],
)
def test_calls_without_or_with_a_wrong_token_are_refused(server, api, method, path):
    for headers in ({}, {"Authorization": "Bearer not-the-key"}):
        resp = requests.request(method, server.url(api) + path, headers=headers, timeout=30)
        assert resp.status_code == 400 and resp.json()["type"] == "InvalidKeyException", resp.text


def test_the_right_token_works_and_inference_keys_do_not_open_management(server):
    assert requests.get(server.url("management") + "/models", headers=server.auth("management"), timeout=30).ok
    wrong_kind = requests.get(server.url("management") + "/models", headers=server.auth("inference"), timeout=30)
    assert wrong_kind.status_code == 400


def test_token_refresh_through_the_token_api(server, png):
    old = server.keys()["management"]["key"]
    server.refresh_token("management")
    new = server.keys()["management"]["key"]
    assert new != old  # TorchServe rewrites key_file.json
    assert requests.get(server.url("management") + "/models", headers={"Authorization": f"Bearer {new}"}, timeout=30).ok
    assert (
        requests.get(
            server.url("management") + "/models", headers={"Authorization": f"Bearer {old}"}, timeout=30
        ).status_code
        == 400
    )
    assert deploy.default_version(server, "my_model") == "1.0"  # the tools read the new key
    assert answers(server, png) == 200


# --- what the management API may load -------------------------------------------------------------------


class CountingHandler(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):  # noqa: N802
        CountingHandler.hits += 1
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"PK")

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def test_disallowed_urls_are_refused_without_any_download(server, store, archive_factory, png, tmp_path):
    httpd = http.server.HTTPServer(("127.0.0.1", 0), CountingHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    outside = install_archive(archive_factory("9.0"), tmp_path, "outside.mar")
    try:
        for url in (
            f"http://127.0.0.1:{httpd.server_port}/x.mar",
            "file:///etc/passwd",
            f"file://{outside}",
            "../x.mar",
            "https://example.com/model.mar",
        ):
            resp = server.request("POST", "management", f"/models?url={url}")
            assert resp.status_code == 404, (url, resp.text)
            assert "allowed" in resp.json()["message"] or "Relative path" in resp.json()["message"]
        assert CountingHandler.hits == 0
    finally:
        httpd.shutdown()
    assert answers(server, png) == 200


# --- archive integrity -----------------------------------------------------------------------------------


def test_register_refuses_tampered_missing_checksum_truncated_and_outside(server, store, archive_factory, tmp_path):
    good = archive_factory("5.0")
    tampered = install_archive(good, store, "tampered.mar")
    with open(tampered, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(deploy.DeployError, match="does not match"):
        deploy.register(server, tampered)
    unsigned = install_archive(good, store, "unsigned.mar")
    os.remove(unsigned + ".sha256")
    with pytest.raises(deploy.DeployError, match="missing"):
        deploy.register(server, unsigned)
    truncated = os.path.join(store, "truncated.mar")
    with open(good, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read()[:20000])
    write_checksum(truncated)  # only the zip check can catch it now
    with pytest.raises(deploy.DeployError, match="truncated or corrupt"):
        deploy.register(server, truncated)
    with pytest.raises(deploy.DeployError, match="not in the model store"):
        deploy.register(server, install_archive(good, tmp_path, "elsewhere.mar"))
    assert {v["modelVersion"] for v in deploy.versions(server, "my_model")} == {"1.0"}


def test_a_corrupt_archive_sent_straight_to_torchserve_leaves_serving_alone(server, store, png):
    with open(os.path.join(store, "my_model.mar"), "rb") as f, open(os.path.join(store, "corrupt.mar"), "wb") as g:
        g.write(f.read()[:30000])
    resp = server.request("POST", "management", "/models?url=corrupt.mar&synchronous=true")
    assert resp.status_code >= 400  # TorchServe 0.12 answers 500 here
    assert answers(server, png) == 200
    assert server.request("GET", "inference", "/ping").status_code == 200


# --- gate, rollback, unregister ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_checkpoint(tmp_path_factory, digits):
    out = train_run(tmp_path_factory.mktemp("bad") / "run", "--epochs", 1, "--limit-samples", 60, "--lr", 1e-5)
    assert json.load(open(os.path.join(out, "metrics.json")))["best_val_acc"] < 0.5
    return os.path.join(out, "checkpoint_last.pt")


def test_gate_rejects_a_bad_model(server, store, archive_factory, bad_checkpoint, trained, tmp_path):
    path = install_archive(archive_factory("3.0", ckpt=bad_checkpoint), store, "my_model_v3.0.mar")
    rc = deploy.cmd_register(server, register_args(path, os.path.join(trained, "golden"), tmp_path))
    assert rc == deploy.EXIT_REJECTED
    report = json.load(open(tmp_path / "gate.json"))
    assert not report["passed"] and report["candidate"]["accuracy"] < report["baseline"]["accuracy"] - 0.01
    assert deploy.default_version(server, "my_model") == "1.0"
    assert "3.0" not in {v["modelVersion"] for v in deploy.versions(server, "my_model")}


def test_dry_run_reports_and_changes_nothing(server, store, archive_factory, trained, tmp_path):
    path = install_archive(archive_factory("2.5"), store, "my_model_v2.5.mar")
    args = register_args(path, os.path.join(trained, "golden"), tmp_path)
    args.dry_run, args.promote = True, False
    assert deploy.cmd_register(server, args) == 0
    assert json.load(open(tmp_path / "gate.json"))["passed"]
    assert deploy.default_version(server, "my_model") == "1.0"
    assert "2.5" not in {v["modelVersion"] for v in deploy.versions(server, "my_model")}


def test_gate_promotes_a_good_model_then_rollback(server, store, archive_factory, trained, tmp_path, png):
    with pytest.raises(deploy.DeployError, match="no earlier default"):
        deploy.rollback(server, "my_model")
    path = install_archive(archive_factory("2.0", backend="onnx"), store, "my_model_v2.0.mar")
    assert deploy.cmd_register(server, register_args(path, os.path.join(trained, "golden"), tmp_path)) == 0
    report = json.load(open(tmp_path / "gate.json"))
    assert report["passed"] and report["agreement"] > 0.95
    assert deploy.default_version(server, "my_model") == "2.0"
    assert deploy.rollback(server, "my_model") == ("2.0", "1.0")
    assert deploy.default_version(server, "my_model") == "1.0"
    deploy.set_default(server, "my_model", "2.0", reason="back to 2.0 for the next tests")
    assert answers(server, png, "1.0") == answers(server, png, "2.0") == 200


def test_the_default_cannot_be_unregistered_while_others_exist(server):
    with pytest.raises(deploy.DeployError, match="is the default version"):
        deploy.unregister(server, "my_model", "2.0")
    assert server.request("DELETE", "management", "/models/my_model/2.0").status_code == 403  # TorchServe agrees


def test_restart_keeps_versions_and_default(server, store, png):
    before = (
        {v["modelVersion"] for v in deploy.versions(server, "my_model")},
        deploy.default_version(server, "my_model"),
    )
    assert before == ({"1.0", "2.0"}, "2.0")
    server.stop()
    info = server.start(models=None)
    assert info["restored"]
    after = (
        {v["modelVersion"] for v in deploy.versions(server, "my_model")},
        deploy.default_version(server, "my_model"),
    )
    assert after == before
    assert answers(server, png, "1.0") == answers(server, png, "2.0") == answers(server, png) == 200


def test_restart_skips_an_archive_that_was_deleted(server, store, png):
    deploy.set_default(server, "my_model", "1.0", reason="test")
    deploy.unregister(server, "my_model", "2.0")
    deploy.register(server, os.path.join(store, "my_model_v2.0.mar"))
    server.stop()
    os.rename(os.path.join(store, "my_model_v2.0.mar"), os.path.join(store, "moved.mar.bak"))
    try:
        server.start(models=None)
        assert {v["modelVersion"] for v in deploy.versions(server, "my_model")} == {"1.0"}
        assert answers(server, png) == 200
    finally:
        os.rename(os.path.join(store, "moved.mar.bak"), os.path.join(store, "my_model_v2.0.mar"))


def test_non_default_version_can_be_unregistered(server, store):
    deploy.register(server, os.path.join(store, "my_model_v2.0.mar"))
    deploy.unregister(server, "my_model", "2.0")
    assert {v["modelVersion"] for v in deploy.versions(server, "my_model")} == {"1.0"}


# --- development mode ------------------------------------------------------------------------------------------


def test_no_token_mode_serves_without_keys_and_closes_the_model_api(store, torchserve_factory, png):
    ts = torchserve_factory(store, overrides={"disable_token_authorization": "true", "enable_model_api": "false"})
    assert requests.post(ts.url() + "/predictions/my_model", data=png, timeout=30).status_code == 200
    resp = requests.post(ts.url("management") + "/models?url=my_model_v2.0.mar", timeout=30)
    assert resp.status_code == 405
