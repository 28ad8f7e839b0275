"""Who may reach this bundle's KServe predictor pods: the Kubernetes NetworkPolicies and the Istio
AuthorizationPolicy that deploy/kserve.py writes beside its manifests, and the pod facts they select on
(the runtime's name and labels, the pod's ports).
"""

from bundle import settings

# The ClusterServingRuntime's name, and the stem of the policies' names and labels.
RUNTIME = "torchserve-bundle"
# The pod's ports: inference (KServe routes here), metrics, and Knative's queue-proxy in front of inference
# (Knative mode only; in Standard mode nothing listens there).
INFERENCE_PORT, METRICS_PORT, QUEUE_PROXY_PORT, QUEUE_PROXY_METRICS_PORT = 8080, 8082, 8012, 9090
# On both InferenceServices: KServe copies an InferenceService's labels to its pods and adds
# component=predictor to a predictor's (pkg/controller/v1beta1/inferenceservice/components/predictor.go,
# buildObjectMeta), so the policies select exactly the predictor pods of this bundle's services.
PART_OF = {"app.kubernetes.io/part-of": RUNTIME}
PREDICTOR = {**PART_OF, "component": "predictor"}
# Who may call the predictors: the ingress gateway, Knative's activator/autoscaler, and pods of the namespace
# that carry CLIENT_LABEL; who may scrape metrics: the monitoring namespace. Change them here for another
# cluster.
ISTIO_NAMESPACE = "istio-system"  # istiod and (by default) the ingress gateway
GATEWAY = (ISTIO_NAMESPACE, {"istio": "ingressgateway"})
KNATIVE_NAMESPACE = "knative-serving"
MONITORING_NAMESPACE = "monitoring"
CLIENT_LABEL = {f"{RUNTIME}/client": "true"}
# What a request may carry (Istio's prefix match, case-sensitive): a url-encoded form goes through Netty's
# form decoder before any handler (issue 25, finding 9), so it is not among them. A request without
# Content-Type reaches the handler as raw bytes and is allowed too.
CONTENT_TYPES = ["application/octet-stream", "application/json*", "image/*", "multipart/form-data*"]


def peer(namespace: str, labels: dict | None = None) -> dict:
    """A NetworkPolicy peer: the pods of `namespace` (those with `labels` only, when given)."""
    # Every namespace carries its name as this label (Kubernetes >= 1.21).
    selected = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}
    return {**selected, "podSelector": {"matchLabels": labels}} if labels else selected


def tcp(*ports: int) -> list[dict]:
    """NetworkPolicy port entries: these TCP ports."""
    return [{"protocol": "TCP", "port": p} for p in ports]


def predictor_policy(name: str, ingress: list[dict], egress: list[dict]) -> dict:
    """A NetworkPolicy on the predictor pods, for both directions: what is not listed is closed."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "podSelector": {"matchLabels": PREDICTOR},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }


def network_policy() -> dict:
    """Ingress to the predictor pods only from the gateway, Knative and labelled clients (inference ports) and
    the monitoring namespace (metrics); no egress at all (a pvc:// storageUri needs none)."""
    clients = [peer(*GATEWAY), {"podSelector": {"matchLabels": CLIENT_LABEL}}]
    ingress = [
        {"from": clients, "ports": tcp(INFERENCE_PORT, QUEUE_PROXY_PORT)},
        {"from": [peer(KNATIVE_NAMESPACE)], "ports": tcp(QUEUE_PROXY_PORT, QUEUE_PROXY_METRICS_PORT)},
        {"from": [peer(MONITORING_NAMESPACE)], "ports": tcp(METRICS_PORT)},
    ]
    return predictor_policy(f"{RUNTIME}-predictor", ingress, egress=[])


def served_paths(model: str = settings.MODEL_NAME) -> dict[str, list[str]]:
    """{method: paths} of what the bundle answers on its inference port (Istio paths: `x*` is a prefix)."""
    return {
        "POST": [
            *(f"/{api}/{model}{tail}" for api in ("predictions", "explanations") for tail in ("", "/*")),
            f"/v1/models/{model}:predict",
            f"/v1/models/{model}:explain",
            f"/v2/models/{model}/infer",
            f"/v2/models/{model}/explain",
        ],
        "GET": ["/ping", "/v2/health/live", "/v2/health/ready"],
    }


def authorization_policy() -> dict:
    """Istio ALLOW policy on the predictor pods: anything not listed (/api-description, management paths,
    other methods, url-encoded bodies) is denied by the sidecar before TorchServe sees it."""
    inference = [str(INFERENCE_PORT), str(QUEUE_PROXY_PORT)]
    to = [{"operation": {"methods": [m], "paths": p, "ports": inference}} for m, p in served_paths().items()]
    to.append({"operation": {"methods": ["GET"], "paths": ["/metrics"], "ports": [str(METRICS_PORT)]}})
    content_type = "request.headers[content-type]"
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": f"{RUNTIME}-predictor"},
        "spec": {
            "selector": {"matchLabels": PREDICTOR},
            "action": "ALLOW",
            "rules": [
                {"to": to, "when": [{"key": content_type, "values": CONTENT_TYPES}]},
                {"to": to, "when": [{"key": content_type, "notValues": ["*"]}]},  # no Content-Type header
            ],
        },
    }


def sidecar_network_policy() -> dict:
    """With Istio, the sidecar in each predictor pod needs istiod (xDS, certificates) and DNS, and Prometheus
    scrapes its merged metrics on 15020: added to network_policy() (NetworkPolicies add up)."""
    dns = {"k8s-app": "kube-dns"}  # CoreDNS keeps kube-dns's label
    ingress = [{"from": [peer(MONITORING_NAMESPACE)], "ports": tcp(15020)}]
    egress = [
        {"to": [peer(ISTIO_NAMESPACE, {"app": "istiod"})], "ports": tcp(15012)},
        {"to": [peer("kube-system", dns)], "ports": [{"protocol": "UDP", "port": 53}, *tcp(53)]},
    ]
    return predictor_policy(f"{RUNTIME}-predictor-sidecar", ingress, egress)
