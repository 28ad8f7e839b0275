"""KServe: the model store as KServe's storage layout (deploy/kserve.py), TorchServe started from it with the
TorchServe runtime's own command line, predictions over /predictions, KServe v1 and v2; the manifests checked
against KServe's published CRD schemas; bad stores refused."""

import base64
import json
import os
import subprocess
import sys

import pytest
import requests
import yaml

from deploy import kserve
from deploy.properties import read_properties
from deploy.server import Ports, TorchServe
from tests.conftest import install_archive


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, archive_factory):
    store = tmp_path_factory.mktemp("kstore")
    install_archive(archive_factory("1.0"), store, "my_model.mar")
    install_archive(archive_factory("2.0"), store, "my_model_v2.0.mar")
    return store


@pytest.fixture(scope="module")
def layout(two_versions, tmp_path_factory):
    return kserve.write_layout(str(two_versions), str(tmp_path_factory.mktemp("kserve") / "out"), default="2.0")


def test_layout_names_versions_default_and_kserve_ports(layout):
    storage = layout["storage"]
    assert sorted(os.listdir(os.path.join(storage, "model-store"))) == [
        "my_model.mar",
        "my_model.mar.sha256",
        "my_model_v2.0.mar",
        "my_model_v2.0.mar.sha256",
    ]
    props = read_properties(os.path.join(storage, "config", "config.properties"))
    snap = json.loads(props["model_snapshot"])
    versions = snap["models"]["my_model"]
    assert sorted(versions) == ["1.0", "2.0"] and snap["modelCount"] == 1
    assert [v for v, e in versions.items() if e["defaultVersion"]] == ["2.0"]
    assert versions["1.0"]["marName"] == "my_model.mar" and versions["2.0"]["batchSize"] == 4  # model-config.yaml
    assert props["inference_address"] == "http://0.0.0.0:8085" and props["metrics_address"].endswith(":8082")
    assert props["enable_envvars_config"] == "true"
    assert props["disable_token_authorization"] == "true" and props["enable_model_api"] == "false"
    assert props["management_address"].startswith("http://127.0.0.1:")


@pytest.mark.slow
@pytest.mark.torchserve
def test_started_as_the_runtime_does_predicts(layout, tmp_path, png):
    """`torchserve --start --model-store=... --ts-config=...` exactly as kserve-torchserve.yaml runs it; free ports
    come in through TS_* variables, as KServe's own settings do (enable_envvars_config)."""
    storage, ports = layout["storage"], Ports.free()
    store = os.path.join(storage, "model-store")
    ts = TorchServe(workdir=str(tmp_path / "ts"), model_store=store, ports=ports, user=None)
    ts.prepare_dirs()
    env = {
        **ts.env(),
        "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ports.inference}",
        "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports.management}",
        "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports.metrics}",
        "TS_GRPC_INFERENCE_PORT": str(ports.grpc_inference),
        "TS_GRPC_MANAGEMENT_PORT": str(ports.grpc_management),
        "TS_METRICS_CONFIG": os.path.join(storage, "config", "metrics.yaml"),  # /mnt/models/... in a pod
    }
    args = [a.replace(kserve.MOUNT, storage) for a in kserve.RUNTIME_ARGS]
    cmd = [os.path.join(os.path.dirname(sys.executable), args[0]), *args[1:]]
    url = f"http://127.0.0.1:{ports.inference}"
    try:
        with open(os.path.join(ts.log_dir, "torchserve.out"), "wb") as out:  # never a pipe: the JVM keeps it open
            subprocess.run(cmd, cwd=ts.workdir, env=env, check=True, timeout=60, stdout=out, stderr=out)
        kserve.wait_ready(url, timeout=180)
        default = requests.post(f"{url}/predictions/my_model", data=png, timeout=60)  # no token: tokens are off
        assert default.status_code == 200, default.text
        assert requests.post(f"{url}/predictions/my_model/1.0", data=png, timeout=60).json() == default.json()

        b64 = base64.b64encode(png).decode()
        v2 = requests.post(
            f"{url}/v2/models/my_model/infer",
            json={"id": "r1", "inputs": [{"name": "img", "datatype": "BYTES", "shape": [1], "data": [b64]}]},
            timeout=60,
        )
        assert v2.status_code == 200 and v2.json()["model_version"] == "2.0"  # the snapshot's default
        assert json.loads(v2.json()["outputs"][0]["data"][0]) == default.json()
        v1 = requests.post(f"{url}/v1/models/my_model:predict", json={"instances": [{"data": b64}] * 2}, timeout=60)
        assert v1.status_code == 200 and v1.json() == [default.json()] * 2

        # Nothing can be registered: the model API is off, whoever reaches management.
        reg = requests.post(f"http://127.0.0.1:{ports.management}/models?url=my_model.mar", timeout=30)
        assert reg.status_code == 405
    finally:
        ts.stop()
    assert not ts.is_running()


def test_manifests_valid_against_kserve_crds(layout):
    docs = {os.path.basename(p): yaml.safe_load(open(p)) for p in layout["manifests"]}
    assert sorted(docs) == ["inferenceservice-v1.yaml", "inferenceservice-v2.yaml", "servingruntime.yaml"]
    for name, doc in docs.items():
        assert kserve.validate(doc) == [], name
    runtime = docs["servingruntime.yaml"]["spec"]["containers"][0]
    assert runtime["args"] == kserve.RUNTIME_ARGS and runtime["image"] == kserve.IMAGE
    assert runtime["securityContext"]["runAsNonRoot"] is True
    for protocol in ("v1", "v2"):
        model = docs[f"inferenceservice-{protocol}.yaml"]["spec"]["predictor"]["model"]
        assert model["protocolVersion"] == protocol and model["runtime"] == kserve.RUNTIME
        assert model["resources"]["limits"]["cpu"] and model["resources"]["requests"]["memory"]


def test_schema_catches_mistakes():
    """The check is strict: a misspelt field (which the API server would silently drop) and a wrong type fail."""
    doc = kserve.inference_service("v2", "pvc://x")
    doc["spec"]["predictor"]["model"]["protocolVersoin"] = "v2"
    doc["spec"]["predictor"]["minReplicas"] = "one"
    doc["apiVersion"] = "serving.kserve.io/v1alpha1"
    errors = "\n".join(kserve.validate(doc))
    assert "protocolVersoin" in errors and "'one' is not of type 'integer'" in errors and "apiVersion" in errors


def test_bad_stores_refused_clearly(tmp_path, two_versions):
    def run(store, out):
        return subprocess.run(
            [sys.executable, "-m", "deploy.kserve", str(out), "--store", str(store)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    missing = run(tmp_path / "nowhere", tmp_path / "o1")
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run(tmp_path / "empty", tmp_path / "o2")
    assert empty.returncode != 0 and "has no my_model.mar" in empty.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    with pytest.raises(kserve.LayoutError, match="versions"):
        kserve.write_layout(str(two_versions), str(tmp_path / "o3"), default="9.9")
