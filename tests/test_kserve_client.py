"""KServe's own Python client (kserve 0.21.0: InferenceRESTClient v2 and v1, InferenceGRPCClient) against a
real TorchServe 0.12, directly and through the HTTPS front door (real HAProxy, the door's CA), and over gRPC
through deploy/oip_grpc.py. kserve cannot live in .venv (it pins psutil, pandas and python-dateutil below
.venv's), so its calls run in .venv-kserve (scripts/setup.sh, requirements-kserve.txt) as
tests/kserve_calls.py, once per route; every request there is built and read by KServe's client.
docs/kserve.md has the table.
"""

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT, cannot_run
from tests.test_oip_http import door  # noqa: F401  (the module's front door, on this module's server)

pytestmark = [pytest.mark.slow, pytest.mark.torchserve]

KSERVE_PYTHON = os.path.join(ROOT, ".venv-kserve", "bin", "python")
CALLS = os.path.join(ROOT, "tests", "kserve_calls.py")
REST_ROUTES = ["direct", "door"]
GRPC_ROUTES = ["grpc", "grpc_door"]  # the proxy's port, and the front door's gRPC port (TLS)


@pytest.fixture(scope="module")
def server(store, torchserve_factory, digits):
    """One TorchServe with OIP on (TS_OPEN_INFERENCE_PROTOCOL over HTTP, deploy/oip_grpc.py over gRPC)."""
    return torchserve_factory(store, overrides={"ts_open_inference_protocol": "true"})


def run_calls(spec: dict, folder) -> dict:
    if not os.access(KSERVE_PYTHON, os.X_OK):
        cannot_run(f"{KSERVE_PYTHON} missing: scripts/setup.sh makes it (requirements-kserve.txt)")
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([KSERVE_PYTHON, CALLS, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def calls(server, door, png, tmp_path_factory):  # noqa: F811
    """route ("direct", "door", "grpc", "grpc_door") -> {call: {"value": ...} or {"error": {...}}}, run once
    per route."""
    folder = tmp_path_factory.mktemp("kserve")
    (folder / "three.png").write_bytes(png)
    base = {"key": server.keys()["inference"]["key"], "image": str(folder / "three.png"), "model": "my_model"}
    specs = {
        "direct": {**base, "rest": f"http://127.0.0.1:{server.ports.inference}", "ca": None},
        "door": {**base, "rest": door.url(), "ca": door.ca},
        "grpc": {**base, "grpc": f"127.0.0.1:{server.ports.oip_grpc}"},
        "grpc_door": {**base, "grpc": f"localhost:{door.grpc_port}", "ca": door.ca},
    }
    results = {}

    def get(route: str) -> dict:
        if route not in results:
            sub = folder / route
            sub.mkdir()
            results[route] = run_calls(specs[route], sub)
        return results[route]

    return get


def ok(outcome: dict):
    assert "value" in outcome, outcome
    return outcome["value"]


def refused(outcome: dict) -> dict:
    assert "error" in outcome, outcome
    return outcome["error"]


def label(answer: dict) -> str:
    """The top label of a v2 answer's predictions ({label: p} as JSON text)."""
    (out,) = answer["outputs"]
    assert out["name"] == "predictions" and out["datatype"] == "BYTES"
    return next(iter(json.loads(out["data"][0])))


def test_clients_have_no_metadata_call_and_rest_explains_v1_only(calls):
    """KServe 0.21's clients: no server or model metadata call (gRPC metadata below goes through KServe's
    stub), REST explain only on v1 (`:explain`; v2 raises UnsupportedProtocol). A kserve that adds one fails
    here, to be tested."""
    health = ["is_model_ready", "is_server_live", "is_server_ready"]
    assert ok(calls("direct")["rest_methods"]) == ["close", "explain", "infer", *health]
    assert ok(calls("grpc")["grpc_methods"]) == ["close", "infer", *health]


@pytest.mark.parametrize("route", REST_ROUTES)
def test_rest_v2_health_and_model_ready(calls, route):
    """TorchServe 0.12 has no /v2/models/m/ready (404: KServe's client says False); the door answers it."""
    got = calls(route)
    assert ok(got["live"]) is True and ok(got["ready"]) is True
    assert ok(got["model_ready"]) is (route == "door")
    assert ok(got["model_ready_unknown"]) is False


@pytest.mark.parametrize("route", REST_ROUTES)
def test_rest_v2_infer_gives_the_label_in_binary_and_json(calls, route):
    got = calls(route)
    binary, as_json, binary_out = (ok(got[k]) for k in ("infer_binary", "infer_json", "infer_binary_output"))
    assert label(binary) == "3" and binary["model_name"] == "my_model"
    assert as_json["outputs"] == binary["outputs"] == binary_out["outputs"]
    assert binary["model_version"] is None  # KServe 0.21's REST client drops it (InferResponse.from_bytes)


@pytest.mark.parametrize("route", REST_ROUTES)
def test_rest_v2_bad_body_is_415_in_the_v2_error_shape(calls, route):
    error = refused(calls(route)["infer_bad_body"])
    assert error["type"] == "HTTPStatusError" and error["status"] == 415
    assert "image" in error["body"]["error"] and error["body"]["model_name"] == "my_model"
    assert error["body"]["error"] in error["message"]  # KServe's client puts the v2 "error" in its message


@pytest.mark.parametrize("route", REST_ROUTES)
def test_rest_v1_predict_and_explain(calls, route):
    got = calls(route)
    (prediction,) = ok(got["v1_predict"])["predictions"]
    assert next(iter(prediction)) == "3"
    (explanation,) = ok(got["v1_explain"])["predictions"]
    assert explanation["class"] == "3" and explanation["attributions"]


@pytest.mark.parametrize("route", REST_ROUTES)
def test_rest_wrong_key_is_refused(calls, route):
    """Every call that raises on an error gets TorchServe's 400; is_model_ready never raises in v2 (False)."""
    got = calls(route)
    for name in ("wrong_key_live", "wrong_key_ready", "wrong_key_infer", "wrong_key_v1_predict"):
        error = refused(got[name])
        assert error["status"] == 400 and "Token Authorization failed" in error["body"]["message"], name
    assert ok(got["wrong_key_model_ready"]) is False


@pytest.mark.parametrize("route", GRPC_ROUTES)
def test_grpc_health_and_metadata(calls, route):
    got = calls(route)
    assert ok(got["live"]) is True and ok(got["ready"]) is True and ok(got["model_ready"]) is True
    assert ok(got["server_metadata"])["name"] == "Torchserve"
    meta = ok(got["model_metadata"])
    assert meta["name"] == "my_model" and meta["versions"] == ["1.0"]
    assert meta["inputs"] == [["data", "BYTES"]] and meta["outputs"] == [["predictions", "BYTES"]]


@pytest.mark.parametrize("route", GRPC_ROUTES)
def test_grpc_infer_gives_the_label(calls, route):
    answer = ok(calls(route)["infer"])
    assert answer["id"] == "k1" and answer["model_version"] == "1.0"
    (out,) = answer["outputs"]
    # the handler's JSON text, as a JSON string in the BYTES element (as tritonclient.grpc reads it too)
    assert next(iter(json.loads(json.loads(out["data"][0])))) == "3"


@pytest.mark.parametrize("route", GRPC_ROUTES)
def test_grpc_bad_body_is_invalid_argument(calls, route):
    error = refused(calls(route)["infer_bad_body"])
    assert error["status"] == "INVALID_ARGUMENT" and "image" in error["body"]


@pytest.mark.parametrize("route", GRPC_ROUTES)
def test_grpc_wrong_key_is_refused_on_every_call(calls, route):
    got = calls(route)
    for name in ("wrong_key_live", "wrong_key_model_ready", "wrong_key_model_metadata", "wrong_key_infer"):
        error = refused(got[name])
        assert error["status"] == "PERMISSION_DENIED" and "Token Authorization failed" in error["body"], name
