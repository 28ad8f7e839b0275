"""The front door's KServe v2 / Open Inference Protocol parts (docs/kserve.md): the HTTP routes TorchServe
0.12 does not answer, and the gRPC listener (TLS, HTTP/2) in front of deploy/oip_grpc.py. FrontDoor
(deploy/frontdoor.py) renders them with the rest of haproxy.cfg (deploy/haproxy_config.py).
"""

import json
from dataclasses import dataclass, field

from bundle import settings
from deploy.haproxy_config import HaproxyConfig, haproxy_quote, json_reply

# The standard OIP gRPC service (what tritonclient and KServe call) and the methods deploy/oip_grpc.py serves;
# the door forwards no other path
GRPC_SERVICE = "inference.GRPCInferenceService"
GRPC_METHODS = ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer")
GRPC_TYPES = ("application/grpc", "application/grpc+proto")  # the media types of gRPC's protobuf messages
GRPC_MAXCONN = 32  # calls inside the proxy at once: its own cap (oip_grpc.serve's maximum_concurrent_rpcs)
# calls at once from one client address, over all its connections and HTTP/2 streams: per_source counts
# connections, and one HTTP/2 connection carries many calls, so one address could fill the proxy's slots and
# the queue (review); with this, filling the 32 slots takes 4 addresses
GRPC_PER_SOURCE = 8
# headers the door deletes before the proxy: who the client says it is or came through (HAProxy 2.6 cannot
# delete all but a list; deploy/oip_grpc.py passes only `authorization` on to TorchServe)
UNVALIDATED = (
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "via",
    "cookie",
)
# gRPC status codes of the door's own answers
UNIMPLEMENTED, PERMISSION_DENIED, INVALID_ARGUMENT, UNAVAILABLE = 12, 7, 3, 14


def grpc_reply(code: int, message: str) -> str:
    """An HAProxy `return` clause answering a gRPC error without a body ("trailers only": HTTP 200 with
    grpc-status and grpc-message in the head), which stock clients raise as that code and message. (HAProxy
    sends no content-type without a body, and takes no empty one; gRPC clients do not need it here.)"""
    return f"status 200 hdr grpc-status {code} hdr grpc-message {haproxy_quote(message)}"


@dataclass
class OipConfig(HaproxyConfig):
    """The door's settings with its KServe v2 parts: the HTTP routes per model and the gRPC listener."""

    # KServe v2 metadata per model name (frontdoor.oip_models): the v2 routes
    models: dict = field(default_factory=dict)
    # the door's gRPC port (TLS, HTTP/2), only when grpc_backend is set (read at call time: tests move it)
    grpc_port: int = field(default_factory=lambda: settings.FRONT_DOOR_GRPC_PORT)
    grpc_backend: int = 0  # deploy/oip_grpc.py's port on 127.0.0.1 (0: the proxy is off, no listener)

    def haproxy_config(self) -> str:
        """The whole haproxy.cfg, with the gRPC listener when the OIP gRPC proxy is on."""
        return super().haproxy_config() + self.grpc_sections()

    # --- KServe v2 / Open Inference Protocol: what TorchServe 0.12 does not answer (docs/kserve.md) ---------
    def oip_rules(self) -> list[str]:
        """Model metadata and readiness, and the versioned infer/explain routes, for each model in
        self.models. Each becomes a request TorchServe answers with the client's own key (metadata and
        readiness: GET /ping, whose 200 the door then replaces with the model's answer), so a wrong key gets
        TorchServe's refusal on every v2 path. Paths are matched whole as strings (no regular expression); any
        other spelling reaches TorchServe unchanged and gets its 404."""
        rules = []
        for name, meta in self.models.items():
            base = f"/v2/models/{name}"
            versioned = [f"{base}/versions/{v}" for v in meta["versions"]]
            rules += [
                f"http-request set-var(txn.oip) str(meta-{name}) if METH_GET "
                f"{{ path -m str {base} {' '.join(versioned)} }}",
                f"http-request set-var(txn.oip) str(ready-{name}) if METH_GET "
                f"{{ path -m str {base}/ready {' '.join(p + '/ready' for p in versioned)} }}",
            ]
            for version, path in zip(meta["versions"], versioned):
                rules += [
                    f"http-request set-path /predictions/{name}/{version} if {{ path -m str {path}/infer }}",
                    f"http-request set-path /explanations/{name}/{version} if {{ path -m str "
                    f"{path}/explain }}",
                ]
            ready = haproxy_quote(json.dumps({"name": name, "ready": True}))
            rules += [
                f"http-response return status 200 content-type application/json file {self.oip_file(name)} "
                f"if {{ var(txn.oip) -m str meta-{name} }} {{ status 200 }}",
                f"http-response return status 200 content-type application/json string {ready} "
                f"if {{ var(txn.oip) -m str ready-{name} }} {{ status 200 }}",
            ]
        return [*rules, "http-request set-path /ping if { var(txn.oip) -m found }"] if rules else []

    def oip_file(self, name: str) -> str:
        """The path of model `name`'s KServe v2 metadata file (FrontDoor.write_oip writes it)."""
        return self.path(f"oip-{name}.json")

    # --- gRPC: the same per-address caps and rate, re-issued over HTTP/2 to deploy/oip_grpc.py ------------
    def grpc_sections(self) -> str:
        """The gRPC frontend and its backend ('' when grpc_backend is 0)."""
        if not self.grpc_backend:
            return ""
        rules = [*self.grpc_refusals(), *self.grpc_reissue()]
        frontend = "frontend oip_grpc\n" + "".join(f"    {rule}\n" for rule in rules)
        server = f"127.0.0.1:{self.grpc_backend} proto h2 maxconn {GRPC_MAXCONN} check inter 2s"
        backend = [
            "backend oip_grpc_calls",  # who has how many calls in flight (sc1_trackers), nothing stored
            "    stick-table type ip size 100k expire 60s",
            "backend oip_grpc",
            f"    http-request return {self.grpc_overloaded()} if {{ queue(oip_grpc) ge {self.queue} }}",
            f"    server oip_grpc {server}",
        ]
        # a defaults section of their own: the public one adds X-Forwarded-For, which gRPC does not need
        return self.defaults_section(forwardfor=False) + frontend + "\n".join(backend) + "\n"

    def grpc_refusals(self) -> list[str]:
        """TLS with ALPN h2, the public frontend's per-address table (connections and rate counted together),
        and what is answered here: anything but HTTP/2 POSTs of the six methods with a gRPC media type."""
        paths = " ".join(f"/{GRPC_SERVICE}/{m}" for m in GRPC_METHODS)
        unknown = grpc_reply(UNIMPLEMENTED, f"no such method: {GRPC_SERVICE}/" + "|".join(GRPC_METHODS))
        untyped = grpc_reply(INVALID_ARGUMENT, "content-type: " + " or ".join(GRPC_TYPES))
        typed = f"{{ req.fhdr(content-type),lower -m str {' '.join(GRPC_TYPES)} }}"
        rules = [
            f"bind {self.bind}:{self.grpc_port} ssl crt {self.pem} alpn h2",
            f"maxconn {self.max_clients}",
            "tcp-request connection track-sc0 src table public",
            f"tcp-request connection reject if {{ sc0_conn_cur gt {self.per_source} }}",
            f"http-request return {json_reply(400, 'BadRequest', 'gRPC only: HTTP/2 (TLS ALPN h2)')} "
            "if !{ req.ver 2.0 }",
            f"http-request return {unknown} if !METH_POST or !{{ path -m str {paths} }}",
            f"http-request return {unknown} if {{ query -m found }}",  # gRPC has none; it is not passed on
            f"http-request return {untyped} if !{{ req.fhdr_cnt(content-type) eq 1 }} or !{typed}",
            f"http-request return {grpc_reply(PERMISSION_DENIED, 'one authorization value at most')} "
            "if { req.fhdr_cnt(authorization) gt 1 }",
        ]
        if self.rate:
            busy = self.grpc_overloaded()
            rules.append(f"http-request return {busy} if {{ sc_http_req_rate(0) gt {self.rate} }}")
        many = grpc_reply(UNAVAILABLE, f"more than {GRPC_PER_SOURCE} calls at once from one address")
        rules += [
            "http-request track-sc1 src table oip_grpc_calls",  # each call (stream) tracks until it ends
            f"http-request return {many} if {{ sc1_trackers gt {GRPC_PER_SOURCE} }}",
        ]
        return rules

    def grpc_overloaded(self) -> str:
        """The door's gRPC answer when the proxy's queue is full or an address is over its rate."""
        return grpc_reply(UNAVAILABLE, f"overloaded, retry after {self.retry_after} s")

    def grpc_reissue(self) -> list[str]:
        """The body held for up to body_timeout s (whole when it fits HAProxy's buffer: a slow sender of it
        gets 408 and never reaches the proxy; a larger one streams on), then the request HAProxy rebuilds for
        the proxy: content-type and te set anew, the UNVALIDATED headers deleted, the client's one
        authorization value kept."""
        down = grpc_reply(UNAVAILABLE, "the OIP gRPC proxy is not answering")
        return [
            f"http-request wait-for-body time {self.body_timeout}s",
            *(f"http-request del-header {name}" for name in UNVALIDATED),
            "http-request set-header content-type application/grpc",
            "http-request set-header te trailers",
            f"http-request return {down} if {{ nbsrv(oip_grpc) eq 0 }}",
            "default_backend oip_grpc",
        ]
