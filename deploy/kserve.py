"""The model store as KServe's storage layout, with a custom serving runtime and InferenceService manifests.

python -m deploy.kserve OUT [--store model_store] [--default VERSION] [--image IMAGE] [--storage-uri URI]

writes
  OUT/storage/config/config.properties   what KServe's TorchServe runtime passes to --ts-config (ports 8085 /
                                         8082 / 7070-7071, enable_envvars_config, model_snapshot: my_model's
                                         versions and default), tokens off (docs/kserve.md says why)
  OUT/storage/config/metrics.yaml        the handler's metrics (serving/metrics.yaml)
  OUT/storage/config/log4j2.xml          the frontend's logging (serving/log4j2.xml)
  OUT/storage/model-store/*.mar          my_model's checked archives (each matches its .sha256)
  OUT/manifests/servingruntime.yaml      ClusterServingRuntime torchserve-bundle: this bundle's image
  OUT/manifests/inferenceservice-v1.yaml, inferenceservice-v2.yaml
  OUT/manifests/networkpolicy.yaml       the predictor pods take inference only from the ingress gateway,
                                         Knative and labelled clients, metrics only from the monitoring
                                         namespace; no egress
  OUT/istio/authorizationpolicy.yaml     (apply when Istio is installed) only the paths, methods and content
                                         types the bundle serves
  OUT/istio/networkpolicy-sidecar.yaml   (with Istio) the sidecar's own traffic: istiod, DNS, merged metrics

Copy OUT/storage to where storageUri points (a PVC, a bucket), then `kubectl apply -f OUT/manifests/` (and
`kubectl apply -f OUT/istio/` where Istio runs). Every manifest is checked against its published schema
(serving/kserve-crd/) before it is written. The policies come from deploy/kserve_policy.py.
"""

import argparse
import glob
import json
import os
import shutil
import zipfile

import requests
import yaml

from bundle import settings
from bundle.properties import read_properties, write_properties
from deploy.frontdoor import FrontDoor
from deploy.kserve_policy import (
    INFERENCE_PORT,
    METRICS_PORT,
    PART_OF,
    RUNTIME,
    authorization_policy,
    network_policy,
    sidecar_network_policy,
)
from deploy.mar import read_manifest, verify_checksum
from deploy.process import wait_until

MOUNT = "/mnt/models"  # where KServe's storage initializer puts storageUri's content
# KServe's TorchServe runtime (config/runtimes/kserve-torchserve.yaml) starts exactly this.
RUNTIME_ARGS = [
    "torchserve",
    "--start",
    f"--model-store={MOUNT}/model-store",
    f"--ts-config={MOUNT}/config/config.properties",
]
IMAGE = "torchserve-bundle:latest"  # push it to your registry and pass --image REGISTRY/torchserve-bundle:TAG
SCHEMAS = os.path.join(settings.ROOT, "serving", "kserve-crd")
# A pod's budget for the default model (2 workers x 1 thread, docs/serving.md), and room for a second version.
RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
SNAPSHOT_KEYS = {  # model_snapshot entry <- the archive's model-config.yaml (TorchServe's defaults otherwise)
    "minWorkers": ("minWorkers", 1),
    "maxWorkers": ("maxWorkers", 1),
    "batchSize": ("batchSize", 1),
    "maxBatchDelay": ("maxBatchDelay", 100),
    "responseTimeout": ("responseTimeout", 120),
}


class LayoutError(ValueError):
    """The model store or OUT cannot make a layout: no store or my_model.mar, an unknown default, OUT/storage
    exists, a manifest off its schema."""


# --- storage layout -----------------------------------------------------------------------------------------


def archive_config(path: str) -> dict:
    """The model-config.yaml an archive ships (its workers and batching), {} when it has none."""
    config_file = read_manifest(path)["model"].get("configFile")
    if not config_file:
        return {}
    with zipfile.ZipFile(path) as z:
        return yaml.safe_load(z.read(config_file)) or {}


def store_versions(store: str, model: str = settings.MODEL_NAME) -> dict[str, str]:
    """{version: archive path} of `model`'s checked archives in `store` (my_model.mar must be one of them)."""
    if not os.path.isdir(store):
        raise LayoutError(f"model store {store} does not exist (build archives with scripts/archive.sh)")
    if not os.path.isfile(os.path.join(store, f"{model}.mar")):
        raise LayoutError(
            f"model store {store} has no {model}.mar (scripts/archive.sh 1.0 CHECKPOINT writes it)"
        )
    versions = {}
    archives = glob.glob(os.path.join(store, f"{model}.mar")) + glob.glob(
        os.path.join(store, f"{model}_v*.mar")
    )
    for path in sorted(archives):
        verify_checksum(path)  # only archives this bundle built and nobody changed go to the cluster
        entry = read_manifest(path)["model"]
        if entry["modelName"] != model:
            raise LayoutError(f"{os.path.basename(path)} holds model {entry['modelName']!r}, not {model!r}")
        versions[entry["modelVersion"]] = path
    return versions


def snapshot(versions: dict[str, str], default: str, model: str = settings.MODEL_NAME) -> dict:
    """TorchServe's model_snapshot: every version with its archive, workers and batching; `default`
    flagged."""
    entries = {}
    for version, path in versions.items():
        config = archive_config(path)
        entry = {"defaultVersion": version == default, "marName": os.path.basename(path)}
        entry.update({key: config.get(name, fallback) for key, (name, fallback) in SNAPSHOT_KEYS.items()})
        entries[version] = entry
    return {"name": "startup.cfg", "modelCount": 1, "models": {model: entries}}


def layout_config(snap: dict) -> dict:
    """config.properties for KServe: this bundle's limits, KServe's ports, everything but inference and
    metrics on the pod's loopback whatever config.properties says (it may expose more on a host:
    --expose-inference)."""
    props = read_properties(settings.CONFIG)
    props.update(
        {
            # KServe's ports: its wrapper (stock runtime) takes 8080 and calls TorchServe on 8085; this
            # bundle's runtime moves inference to 8080 with TS_INFERENCE_ADDRESS (enable_envvars_config).
            "inference_address": "http://0.0.0.0:8085",
            "management_address": "http://127.0.0.1:8081",
            "metrics_address": f"http://0.0.0.0:{METRICS_PORT}",
            # gRPC has no switch to turn it off in 0.12: both servers stay on the pod's loopback (management
            # would register any directory for whoever reaches it, finding 3; the NetworkPolicy opens neither
            # port).
            "grpc_inference_address": "127.0.0.1",
            "grpc_management_address": "127.0.0.1",
            "grpc_inference_port": "7070",
            "grpc_management_port": "7071",
            # No front door in the pod: each waiting request holds its body (up to max_request_size), so the
            # queue is what the front door lets inside TorchServe, not the host's 1024 (64 x 16 MiB fits the
            # pod's memory limit; Knative's containerConcurrency caps at the same number).
            "job_queue_size": str(FrontDoor.maxconn),
            "enable_envvars_config": "true",
            "model_store": f"{MOUNT}/model-store",
            "metrics_config": f"{MOUNT}/config/metrics.yaml",
            "vmargs": f"-Dlog4j.configurationFile={MOUNT}/config/log4j2.xml",
            # KServe's wrapper and probes send no token: tokens off, and with them the registration API, so
            # nothing can load code into the pod; the versions are fixed by model_snapshot (docs/kserve.md).
            "disable_token_authorization": "true",
            "enable_model_api": "false",
            "model_snapshot": json.dumps(snap),
        }
    )
    return props


def write_storage(store: str, out: str, default: str | None = None) -> dict:
    """OUT/storage: the checked archives, config.properties with their model_snapshot, metrics and logging
    configs; returns {storage, config, versions, default}."""
    versions = store_versions(store)
    default = (
        default or read_manifest(os.path.join(store, f"{settings.MODEL_NAME}.mar"))["model"]["modelVersion"]
    )
    if default not in versions:
        raise LayoutError(f"--default {default}: my_model has versions {sorted(versions)} in {store}")
    storage = os.path.join(out, "storage")
    if os.path.exists(storage):
        raise LayoutError(f"{storage} exists already; choose another OUT (nothing is overwritten)")
    os.makedirs(os.path.join(storage, "config"))
    os.makedirs(os.path.join(storage, "model-store"))
    for path in versions.values():
        shutil.copy(path, os.path.join(storage, "model-store"))
        shutil.copy(path + ".sha256", os.path.join(storage, "model-store"))
    shutil.copy(settings.METRICS_CONFIG, os.path.join(storage, "config", "metrics.yaml"))
    shutil.copy(settings.LOG_CONFIG, os.path.join(storage, "config", "log4j2.xml"))
    config = os.path.join(storage, "config", "config.properties")
    write_properties(
        config, layout_config(snapshot(versions, default)), "generated by deploy/kserve.py for KServe"
    )
    return {"storage": storage, "config": config, "versions": sorted(versions), "default": default}


# --- manifests ----------------------------------------------------------------------------------------------


def serving_runtime(image: str) -> dict:
    """The ClusterServingRuntime that starts TorchServe from `image` as KServe's runtime does, answering on
    the port KServe routes to."""
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ClusterServingRuntime",
        "metadata": {"name": RUNTIME},
        "spec": {
            "annotations": {
                "prometheus.kserve.io/port": str(METRICS_PORT),
                "prometheus.kserve.io/path": "/metrics",
            },
            "supportedModelFormats": [{"name": "pytorch", "version": "1", "autoSelect": False}],
            "protocolVersions": ["v1", "v2"],
            "containers": [
                {
                    "name": "kserve-container",
                    "image": image,
                    # the stock runtime's command; the image's entry point runs it in front
                    "args": RUNTIME_ARGS,
                    # No wrapper in this image: TorchServe itself answers /v1/models/my_model:predict,
                    # /v2/models/my_model/infer and /predictions/my_model on the port KServe routes to.
                    "env": [{"name": "TS_INFERENCE_ADDRESS", "value": f"http://0.0.0.0:{INFERENCE_PORT}"}],
                    "ports": [{"containerPort": INFERENCE_PORT, "name": "http1", "protocol": "TCP"}],
                    "securityContext": {
                        "runAsUser": 1000,
                        "runAsNonRoot": True,
                        "allowPrivilegeEscalation": False,
                        "privileged": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "resources": RESOURCES,
                }
            ],
        },
    }


def inference_service(protocol: str, storage_uri: str) -> dict:
    """The InferenceService my-model-`protocol` (v1 or v2) on this bundle's runtime, its models at
    `storage_uri`."""
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": f"my-model-{protocol}", "labels": PART_OF},
        "spec": {
            "predictor": {
                "minReplicas": 1,
                # The front door's limits that KServe can carry (docs/kserve.md lists those it cannot):
                # requests inside the pod at once (Knative's queue-proxy holds the rest) and the answer's
                # deadline.
                "containerConcurrency": FrontDoor.maxconn,
                "timeout": int(read_properties(settings.CONFIG)["default_response_timeout"]),
                # With enable_envvars_config, TorchServe reads every TS_* variable: a Service named e.g.
                # ts-grpc-management in the namespace would inject TS_GRPC_MANAGEMENT_PORT=tcp://... (service
                # links).
                "enableServiceLinks": False,
                "automountServiceAccountToken": False,  # model code never needs the Kubernetes API
                "model": {
                    "modelFormat": {"name": "pytorch"},
                    "protocolVersion": protocol,
                    "runtime": RUNTIME,
                    "storageUri": storage_uri,
                    "resources": RESOURCES,
                },
            }
        },
    }


def strict(schema):
    """A CRD's structural schema as `kubectl apply --validate=strict` reads it: an object's unknown fields are
    errors (the API server would silently prune them), unless the schema preserves them."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            if not schema.get("x-kubernetes-preserve-unknown-fields"):
                schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def validate(manifest: dict) -> list[str]:
    """Errors of `manifest` against the published schema for its kind (serving/kserve-crd/: KServe's CRDs,
    Kubernetes' NetworkPolicy, Istio's AuthorizationPolicy CRD; each file names its source)."""
    import jsonschema

    kinds = {
        "InferenceService": "inferenceservice.json",
        "ClusterServingRuntime": "clusterservingruntime.json",
        "NetworkPolicy": "networkpolicy.json",
        "AuthorizationPolicy": "authorizationpolicy.json",
    }
    if manifest.get("kind") not in kinds:
        return [f"kind {manifest.get('kind')!r}: only {sorted(kinds)} are checked"]
    with open(os.path.join(SCHEMAS, kinds[manifest["kind"]])) as f:
        crd = json.load(f)
    errors = []
    if manifest.get("apiVersion") != f"{crd['group']}/{crd['version']}":
        errors.append(f"apiVersion {manifest.get('apiVersion')!r}: expected {crd['group']}/{crd['version']}")
    validator = jsonschema.Draft7Validator(strict(crd["openAPIV3Schema"]))
    for e in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        errors.append(f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}")
    return errors


def write_manifests(out: str, image: str, storage_uri: str) -> list[str]:
    """OUT/manifests/ (apply everywhere) and OUT/istio/ (apply where Istio is installed), each file validated
    before any is written."""
    docs = {
        "manifests/servingruntime.yaml": serving_runtime(image),
        "manifests/inferenceservice-v1.yaml": inference_service("v1", storage_uri),
        "manifests/inferenceservice-v2.yaml": inference_service("v2", storage_uri),
        "manifests/networkpolicy.yaml": network_policy(),
        "istio/authorizationpolicy.yaml": authorization_policy(),
        "istio/networkpolicy-sidecar.yaml": sidecar_network_policy(),
    }
    for name, doc in docs.items():
        errors = validate(doc)
        if errors:
            raise LayoutError(f"{name} does not match its published schema: " + "; ".join(errors))
    paths = []
    for name, doc in docs.items():
        paths.append(os.path.join(out, name))
        os.makedirs(os.path.dirname(paths[-1]), exist_ok=True)
        with open(paths[-1], "w") as f:
            # a copy: no YAML anchors for shared parts
            yaml.safe_dump(json.loads(json.dumps(doc)), f, sort_keys=False)
    return paths


def write_layout(
    store: str = settings.MODEL_STORE,
    out: str = "kserve",
    default: str | None = None,
    image: str = IMAGE,
    storage_uri: str = "pvc://model-store/my_model",
) -> dict:
    """OUT/storage and the manifests (write_storage, write_manifests); returns write_storage's dict with
    the manifest paths under `manifests`."""
    info = write_storage(store, out, default)
    info["manifests"] = write_manifests(out, image, storage_uri)
    return info


def wait_ready(url: str, timeout: float = 180, headers=None):
    """Until `url` (a TorchServe inference address) answers /ping 200: TorchServe says Healthy only once every
    model's minimum of workers runs (what KServe's readiness probe sees too)."""

    def ready() -> bool | str:
        try:
            ping = requests.get(f"{url}/ping", headers=headers, timeout=5)
        except requests.RequestException as e:
            return e.__class__.__name__
        return ping.status_code == 200 or f"ping {ping.status_code} {ping.text.strip()[:80]}"

    wait_until(ready, timeout, url, interval=1, error=TimeoutError)


def main(argv=None):
    """The command line: write the layout, print what was written; exit 1 with the reason on a
    LayoutError."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to create: OUT/storage (copy to storageUri) and OUT/manifests")
    p.add_argument("--store", default=settings.MODEL_STORE, help="model store holding my_model's archives")
    p.add_argument("--default", default=None, help="default version (default: my_model.mar's)")
    p.add_argument(
        "--image", default=IMAGE, help="the serving runtime's image (this bundle's, in your registry)"
    )
    p.add_argument("--storage-uri", default="pvc://model-store/my_model", help="where OUT/storage will live")
    args = p.parse_args(argv)
    try:
        info = write_layout(args.store, args.out, args.default, args.image, args.storage_uri)
    except (LayoutError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{info['storage']}: my_model {', '.join(info['versions'])} (default {info['default']})")
    for path in info["manifests"]:
        print(f"{path}: valid against its published schema")


if __name__ == "__main__":
    main()
