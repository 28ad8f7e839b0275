"""KServe: the model store as KServe's storage layout (deploy/kserve.py), TorchServe started from it with the
TorchServe runtime's own command line, predictions over /predictions, KServe v1 and v2; the manifests checked
against their published schemas; the policies that stand in for tokens in the pod (NetworkPolicy, Istio
AuthorizationPolicy) evaluated against sample pods and requests; bad stores refused."""

import base64
import json
import os
import subprocess
import sys
from urllib.parse import urlsplit

import psutil
import pytest
import requests
import yaml

from bundle import settings
from bundle.properties import read_properties, write_properties
from deploy import kserve, kserve_policy
from deploy.frontdoor import FrontDoor
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
    return kserve.write_layout(
        str(two_versions), str(tmp_path_factory.mktemp("kserve") / "out"), default="2.0"
    )


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
    # model-config.yaml
    assert versions["1.0"]["marName"] == "my_model.mar" and versions["2.0"]["batchSize"] == 4
    assert props["inference_address"] == "http://0.0.0.0:8085" and props["metrics_address"].endswith(":8082")
    assert props["enable_envvars_config"] == "true"
    assert props["disable_token_authorization"] == "true" and props["enable_model_api"] == "false"
    assert props["management_address"].startswith("http://127.0.0.1:")


@pytest.mark.slow
@pytest.mark.torchserve
def test_started_as_the_runtime_does_predicts(layout, tmp_path, png):
    """`torchserve --start --model-store=... --ts-config=...` exactly as kserve-torchserve.yaml runs it; free
    ports come in through TS_* variables, as KServe's own settings do (enable_envvars_config)."""
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
        with open(
            os.path.join(ts.log_dir, "torchserve.out"), "wb"
        ) as out:  # never a pipe: the JVM keeps it open
            subprocess.run(cmd, cwd=ts.workdir, env=env, check=True, timeout=60, stdout=out, stderr=out)
        kserve.wait_ready(url, timeout=180)
        # no token: tokens are off
        default = requests.post(f"{url}/predictions/my_model", data=png, timeout=60)
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
        v1 = requests.post(
            f"{url}/v1/models/my_model:predict", json={"instances": [{"data": b64}] * 2}, timeout=60
        )
        assert v1.status_code == 200 and v1.json() == {"predictions": [default.json()] * 2}

        # Nothing can be registered: the model API is off, whoever reaches management.
        reg = requests.post(f"http://127.0.0.1:{ports.management}/models?url=my_model.mar", timeout=30)
        assert reg.status_code == 405
        # gRPC (whose addresses come from the layout's config alone here) listens on loopback only.
        grpc = {ports.grpc_inference, ports.grpc_management}
        listening = [
            c.laddr for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port in grpc
        ]
        assert sorted(a.port for a in listening) == sorted(grpc)
        # Java's IPv6 socket, v4 address
        assert {a.ip.removeprefix("::ffff:") for a in listening} == {"127.0.0.1"}
    finally:
        ts.stop()
    assert not ts.is_running()


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """{path under OUT: document} as write_manifests writes them (no archives needed)."""
    out = tmp_path_factory.mktemp("kmanifests")
    paths = kserve.write_manifests(str(out), kserve.IMAGE, "pvc://model-store/my_model")
    return {os.path.relpath(p, out): yaml.safe_load(open(p)) for p in paths}


def test_manifests_valid_against_published_schemas(manifests):
    assert sorted(manifests) == [
        "istio/authorizationpolicy.yaml",
        "istio/networkpolicy-sidecar.yaml",
        "manifests/inferenceservice-v1.yaml",
        "manifests/inferenceservice-v2.yaml",
        "manifests/networkpolicy.yaml",
        "manifests/servingruntime.yaml",
    ]
    for name, doc in manifests.items():
        assert kserve.validate(doc) == [], name
    runtime = manifests["manifests/servingruntime.yaml"]["spec"]["containers"][0]
    assert runtime["args"] == kserve.RUNTIME_ARGS and runtime["image"] == kserve.IMAGE
    assert runtime["securityContext"]["runAsNonRoot"] is True
    for protocol in ("v1", "v2"):
        predictor = manifests[f"manifests/inferenceservice-{protocol}.yaml"]["spec"]["predictor"]
        model = predictor["model"]
        assert model["protocolVersion"] == protocol and model["runtime"] == kserve_policy.RUNTIME
        assert model["resources"]["limits"]["cpu"] and model["resources"]["requests"]["memory"]
        # The front door's limits KServe can carry; no service-link variables for enable_envvars_config to
        # read.
        assert predictor["containerConcurrency"] == FrontDoor.maxconn and predictor["timeout"] > 0
        assert predictor["enableServiceLinks"] is False and predictor["automountServiceAccountToken"] is False


def test_schema_catches_mistakes():
    """The check is strict: a misspelt field (which the API server would silently drop) and a wrong type
    fail."""
    doc = kserve.inference_service("v2", "pvc://x")
    doc["spec"]["predictor"]["model"]["protocolVersoin"] = "v2"
    doc["spec"]["predictor"]["minReplicas"] = "one"
    doc["apiVersion"] = "serving.kserve.io/v1alpha1"
    errors = "\n".join(kserve.validate(doc))
    assert (
        "protocolVersoin" in errors and "'one' is not of type 'integer'" in errors and "apiVersion" in errors
    )

    netpol = kserve_policy.network_policy()
    netpol["spec"]["podSelecter"] = netpol["spec"].pop("podSelector")
    netpol["spec"]["ingress"][0]["ports"][0]["port"] = 8080.5
    errors = "\n".join(kserve.validate(netpol))
    assert "podSelecter" in errors and "spec.ingress.0.ports.0.port" in errors

    authz = kserve_policy.authorization_policy()
    authz["spec"]["rules"][0]["to"][0]["operation"]["ports"] = [8080]  # Istio's ports are strings
    authz["spec"]["action"] = "PERMIT"
    errors = "\n".join(kserve.validate(authz))
    assert "8080 is not of type 'string'" in errors and "'PERMIT' is not one of" in errors


# --- the policies, evaluated the way Kubernetes and Istio read them -----------------------------------------


def predictor_pod_labels(isvc: dict) -> dict:
    """The labels KServe gives an InferenceService's predictor pods: the service's own labels and the
    predictor's, then its two (kserve pkg/controller/v1beta1/inferenceservice/components/predictor.go,
    buildObjectMeta)."""
    return {
        **isvc["metadata"].get("labels", {}),
        **isvc["spec"]["predictor"].get("labels", {}),
        "serving.kserve.io/inferenceservice": isvc["metadata"]["name"],
        "component": "predictor",
    }


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions, ANDed)."""
    ops = {
        "In": lambda k, vs: k in labels and labels[k] in vs,
        "NotIn": lambda k, vs: k not in labels or labels[k] not in vs,
        "Exists": lambda k, vs: k in labels,
        "DoesNotExist": lambda k, vs: k not in labels,
    }
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
        ops[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", [])
    )


def admits(policy: dict, namespace: str, labels: dict, port: int, own_namespace: str = "models") -> bool:
    """Whether `policy`'s ingress rules let a pod (`namespace`, `labels`) connect to `port` on a selected
    pod."""

    def peer_matches(peer):
        ns_ok = (
            selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
            if "namespaceSelector" in peer
            else namespace == own_namespace
        )
        return ns_ok and ("podSelector" not in peer or selects(peer["podSelector"], labels))

    return any(
        any(map(peer_matches, rule.get("from", [{}]))) and any(p.get("port") == port for p in rule["ports"])
        for rule in policy["spec"].get("ingress", [])
    )


def test_network_policy_selects_the_predictors_and_admits_only_its_peers(manifests):
    policy = manifests["manifests/networkpolicy.yaml"]
    selector = policy["spec"]["podSelector"]
    for protocol in ("v1", "v2"):
        isvc = manifests[f"manifests/inferenceservice-{protocol}.yaml"]
        assert selects(selector, predictor_pod_labels(isvc)), protocol
        assert not selects(selector, {**predictor_pod_labels(isvc), "component": "transformer"})
    other = {"metadata": {"name": "someone-else"}, "spec": {"predictor": {}}}  # another service's predictor
    assert not selects(selector, predictor_pod_labels(other))
    istio = manifests["istio/authorizationpolicy.yaml"]["spec"]["selector"]
    assert (
        istio == selector and manifests["istio/networkpolicy-sidecar.yaml"]["spec"]["podSelector"] == selector
    )

    gateway_ns, gateway_labels = kserve_policy.GATEWAY
    assert admits(policy, gateway_ns, gateway_labels, 8080)
    assert admits(policy, "models", kserve_policy.CLIENT_LABEL, 8080)
    assert admits(policy, "knative-serving", {"app": "activator"}, 8012)
    assert admits(policy, "monitoring", {"app": "prometheus"}, 8082)
    assert not admits(policy, "models", {"app": "anything"}, 8080)  # a pod of the namespace without the label
    # the label counts in the namespace only
    assert not admits(policy, "elsewhere", kserve_policy.CLIENT_LABEL, 8080)
    assert not admits(policy, gateway_ns, {"app": "other"}, 8080)
    assert not admits(policy, "monitoring", {"app": "prometheus"}, 8080)  # metrics only
    for port in (8081, 8085, 7070, 7071):  # management, the stock runtime's inference, gRPC: nobody
        assert not any(
            admits(policy, ns, labels, port)
            for ns, labels in [kserve_policy.GATEWAY, ("models", kserve_policy.CLIENT_LABEL)]
        )
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and policy["spec"]["egress"] == []


def istio_match(pattern: str, value: str) -> bool:
    """Istio's string match for paths and header values: exact, `x*` prefix, `*x` suffix, `*` any."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def istio_allows(policy: dict, method: str, url: str, port: int, headers: dict | None = None) -> bool:
    """An ALLOW AuthorizationPolicy's verdict: some rule matches, i.e. one of its operations and all its
    `when` conditions (paths match without the query, as Istio does; header names are case-insensitive, values
    not)."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    path = urlsplit(url).path

    def operation(op):
        return (
            method in op.get("methods", [method])
            and any(istio_match(p, path) for p in op.get("paths", ["*"]))
            and str(port) in op.get("ports", [str(port)])
        )

    def condition(c):
        name = c["key"].removeprefix("request.headers[").removesuffix("]").lower()
        hit = name in headers and any(istio_match(v, headers[name]) for v in c.get("values", []))
        miss = not (name in headers and any(istio_match(v, headers[name]) for v in c.get("notValues", [])))
        return (hit if "values" in c else True) and miss

    assert policy["spec"]["action"] == "ALLOW"
    return any(
        any(operation(t["operation"]) for t in rule.get("to", [{"operation": {}}]))
        and all(map(condition, rule.get("when", [])))
        for rule in policy["spec"]["rules"]
    )


ALLOWED = [
    ("POST", "/predictions/my_model", 8080, {"Content-Type": "application/octet-stream"}),
    ("POST", "/predictions/my_model/2.0", 8080, {"Content-Type": "image/png"}),
    ("POST", "/predictions/my_model?topk=3", 8080, {}),  # no Content-Type: raw bytes to the handler
    ("POST", "/explanations/my_model", 8080, {"Content-Type": "image/jpeg"}),
    ("POST", "/predictions/my_model", 8080, {"Content-Type": "multipart/form-data; boundary=x"}),
    ("POST", "/v1/models/my_model:predict", 8080, {"Content-Type": "application/json"}),
    ("POST", "/v2/models/my_model/infer", 8012, {"Content-Type": "application/json; charset=utf-8"}),
    ("GET", "/ping", 8080, {}),
    ("GET", "/v2/health/ready", 8080, {}),
    ("GET", "/metrics", 8082, {}),
]
DENIED = [
    ("GET", "/api-description", 8080, {}),  # names TorchServe's version, without a key
    ("OPTIONS", "/", 8080, {}),  # the same description
    ("GET", "/v2", 8080, {}),  # server metadata
    ("GET", "/models", 8080, {}),
    ("POST", "/models?url=/some/dir", 8080, {}),
    ("POST", "/models?url=my_model.mar", 8081, {}),  # management's port (loopback anyway)
    ("POST", "/predictions/my_model", 7071, {}),
    (
        "POST",
        "/predictions/my_model",
        8080,
        {"Content-Type": "application/x-www-form-urlencoded"},
    ),  # finding 9
    ("POST", "/predictions/my_model", 8080, {"Content-Type": "Application/X-WWW-Form-Urlencoded"}),
    ("POST", "/predictions/my_model", 8080, {"Content-Type": "text/plain"}),
    ("POST", "/predictions/other_model", 8080, {"Content-Type": "image/png"}),
    ("POST", "/my_model/predict", 8080, {"Content-Type": "image/png"}),  # TorchServe's legacy path
    ("POST", "/invocations?model_name=my_model", 8080, {"Content-Type": "image/png"}),
    ("GET", "/predictions/my_model", 8080, {}),
    ("PUT", "/predictions/my_model", 8080, {"Content-Type": "image/png"}),
    ("GET", "/metrics", 8080, {}),
    ("POST", "/metrics", 8082, {"Content-Type": "application/json"}),
]


def test_authorization_policy_allows_only_what_the_bundle_serves(manifests):
    policy = manifests["istio/authorizationpolicy.yaml"]
    assert [r for r in ALLOWED if not istio_allows(policy, *r)] == []
    assert [r for r in DENIED if istio_allows(policy, *r)] == []


def test_pod_keeps_management_and_grpc_on_loopback(tmp_path, monkeypatch):
    """Whatever the host's config.properties exposes (here everything on 0.0.0.0), the pod's config keeps
    management and both gRPC servers on the pod's loopback, also after the runtime's TS_* variables (read
    through enable_envvars_config), and holds no more waiting requests than the front door lets in."""
    host = read_properties(settings.CONFIG)
    for key in ("inference_address", "management_address", "metrics_address"):
        host[key] = host[key].replace("127.0.0.1", "0.0.0.0")
    host.update(grpc_inference_address="0.0.0.0", grpc_management_address="0.0.0.0")
    write_properties(str(tmp_path / "exposed.properties"), host, "a host config that exposes everything")
    monkeypatch.setattr(settings, "CONFIG", str(tmp_path / "exposed.properties"))

    pod = kserve.layout_config({})
    env = kserve.serving_runtime(kserve.IMAGE)["spec"]["containers"][0]["env"]
    pod.update(
        {e["name"].removeprefix("TS_").lower(): e["value"] for e in env if e["name"].startswith("TS_")}
    )
    assert urlsplit(pod["management_address"]).hostname == "127.0.0.1"
    assert pod["grpc_management_address"] == "127.0.0.1" and pod["grpc_inference_address"] == "127.0.0.1"
    assert pod["enable_model_api"] == "false"
    assert int(pod["job_queue_size"]) == FrontDoor.maxconn


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
