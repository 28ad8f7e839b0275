"""The front door's haproxy.cfg (deploy/frontdoor.py runs it): the settings HAProxy is told and the sections
they render (global, defaults, the public frontend, one backend per lane, the canary); the KServe v2 routes
and the gRPC listener are deploy/haproxy_oip.py's.
"""

import os
import pwd
import secrets
from dataclasses import dataclass, field

from bundle import settings
from deploy.errors import error_body

RETRY_AFTER_DOWN = 5  # s, when TorchServe does not accept connections (restarting)
# path of a model in canary -> the candidate's version (deploy/canary.py writes it live)
CANARY_MAP = "canary.map"
# The access log: ms is the whole request (the client's upload and download too), srv_ms TorchServe's
# answer (%Tr)
LOG_FORMAT = "%t client=%ci:%cp status=%ST ms=%Ta srv_ms=%Tr queue_ms=%Tw wait=%sq/%bq lane=%b server=%s"
LOG_FORMAT += " bytes=%B %{+Q}r"
CANARY_WEIGHT = 100  # the canary backend's weights add up to this: a weight is a share in percent
TEE_RUN_DIR = "/run/torchserve-bundle-door-{port}"  # the tee's folder when HAProxy drops to its own user
SHADOW_MAXCONN = 8  # requests in the tee at once (one thread each); more wait in the canary backend


# TLS 1.2 suites: ECDHE key exchange and AEAD ciphers only (ECDSA for the generated certificate, RSA for a
# real one)
TLS12_CIPHERS = ":".join(
    f"ECDHE-{auth}-{cipher}"
    for auth in ("ECDSA", "RSA")
    for cipher in ("AES128-GCM-SHA256", "AES256-GCM-SHA384", "CHACHA20-POLY1305")
)
# Media types the handler reads (handlers/image_classifier.py), besides image/* and no Content-Type at all
SERVED_TYPES = ("application/octet-stream", "application/json", "multipart/form-data", "text/plain")
UNSUPPORTED = (
    "send the image as application/octet-stream or image/*, base64 in application/json, or as a "
    "multipart/form-data file (no url-encoded forms)"
)


def json_reply(status: int, kind: str, message: str, retry_after: int | None = None) -> str:
    """An HAProxy `return`/`http-error` clause answering a JSON body shaped like TorchServe's own errors."""
    body = error_body(status, kind, message)
    hdr = f" hdr Retry-After {retry_after}" if retry_after else ""
    return f"status {status} content-type application/json{hdr} string {haproxy_quote(body)}"


def haproxy_quote(text: str) -> str:
    """A word of HAProxy's configuration that reads back as `text`: single quotes keep everything literal
    (no escapes, no $VAR); a single quote itself closes them, is escaped outside, and they reopen."""
    if "\n" in text or "\r" in text or "\0" in text:
        raise ValueError("an HAProxy configuration word cannot hold a line break or NUL")
    return "'" + text.replace("'", "'\\''") + "'"


def drops_privileges() -> bool:
    """Whether HAProxy drops to the haproxy user (started as root, and the user exists)."""
    return os.geteuid() == 0 and has_user("haproxy")


def has_user(name: str) -> bool:
    """Whether this machine has a user called `name`."""
    return name in {entry.pw_name for entry in pwd.getpwall()}


@dataclass
class HaproxyConfig:
    """The front door's settings, and the haproxy.cfg they render (haproxy_config())."""

    backend: int  # TorchServe's inference port on 127.0.0.1
    port: int = field(default_factory=lambda: settings.FRONT_DOOR_PORT)  # read at call time (tests move it)
    bind: str = "0.0.0.0"
    folder: str = field(default_factory=lambda: settings.FRONT_DOOR_DIR)
    max_body: int = 16 << 20  # TorchServe's max_request_size: give the same (for_server does)
    maxconn: int = 64  # requests inside TorchServe at once (docs/frontdoor.md: 8, 16 and 64 measured)
    queue: int = 1024  # requests waiting in the proxy; more are answered 503 at once
    queue_timeout: int = 10  # s a request may wait in the queue before its 503
    retry_after: int = 1  # s, in Retry-After and the message of a 503/429
    rate: int = 0  # requests per second per client address before 429 (0: no limit)
    server_timeout: int = 60  # s for TorchServe's answer (its default_response_timeout is 30)
    rate_period: int = 1  # s over which `rate` is counted
    # Slow and many clients (docs/frontdoor.md): caps per address, and a deadline for each phase of a request
    per_source: int = 256  # connections at once from one client address; more are closed at accept
    max_clients: int = 4096  # connections at once in all (HAProxy's maxconn), idle ones included
    handshake_timeout: int = 10  # s for the TLS handshake (and inactivity while a request or answer flows)
    request_timeout: int = 5  # s for a request's head (408 after)
    body_timeout: int = 10  # s for a body to arrive whole before the request is queued (408 after)
    idle_timeout: int = 10  # s a kept-alive connection may wait for its next request
    buffer: int = 64 << 10  # bytes: bodies up to ~this are held whole; larger ones stream, in the bulk lane
    # bytes of a multipart/form-data body (Netty form-decodes it: its cost grows with parts)
    max_form: int = 4 << 20
    # Lanes: explanations cost seconds each, streamed bodies hold their slot while they arrive
    explain_maxconn: int = 1  # explanations inside TorchServe at once
    explain_queue: int = 8  # explanations waiting; more get 503 at once
    explain_rate: int = 10  # explanations per client address per explain_period before 429 (0: no limit)
    explain_period: int = 60  # s
    bulk_maxconn: int = 4  # requests whose body is larger than `buffer`, inside TorchServe at once
    bulk_queue: int = 64
    cert: str | None = None  # a real certificate instead of the generated one
    metrics_port: int = (
        0  # HAProxy's Prometheus exporter on 127.0.0.1:PORT/metrics (0: off); a canary reads it
    )

    def path(self, name: str) -> str:
        """The path of file `name` in the door's folder."""
        return os.path.join(self.folder, name)

    pem = property(lambda self: self.cert or self.path("server.pem"))

    # --- configuration --------------------------------------------------------------------------------
    def haproxy_config(self) -> str:
        """The whole haproxy.cfg: global, defaults, the public frontend, one backend per lane, the canary."""
        return "\n".join(
            ["# generated by deploy/frontdoor.py; do not edit (docs/frontdoor.md)", self.global_section(),
             self.defaults_section(), self.frontend_section(),
             *(self.backend_section(*lane) for lane in self.lanes()), self.canary_sections()]
        )  # fmt: skip

    @property
    def canary_wait(self) -> int:
        """Seconds the canary backend waits for an answer: longer than the inner hop's queue + server time."""
        return self.queue_timeout + self.server_timeout + 5

    def lanes(self) -> list[tuple[str, int, int]]:
        """(backend, requests inside TorchServe at once, requests waiting) per lane: predictions, explanations
        (costly: they must never take the slots predictions need), and bodies too large to buffer (they
        stream, so a slow sender holds its slot: keep those few)."""
        return [
            ("torchserve", self.maxconn, self.queue),
            ("explain", self.explain_maxconn, self.explain_queue),
            ("bulk", self.bulk_maxconn, self.bulk_queue),
        ]

    @property
    def tee_socket(self) -> str:
        """Where a shadow run's tee listens: the door's own 0700 folder, or, when HAProxy drops to its user
        (who cannot enter that folder), a root-only folder under /run (made by shadow.listen)."""
        folder = TEE_RUN_DIR.format(port=self.port) if drops_privileges() else self.folder
        return os.path.join(folder, "tee.sock")

    def global_section(self) -> str:
        """HAProxy's process settings: one thread, the connection cap, buffer, admin socket, TLS floor;
        it drops to the haproxy user when started as root."""
        drop = "    user haproxy\n    group haproxy\n" if drops_privileges() else ""
        return f"""global
    # One thread: on 2 cores shared with TorchServe, a second one doubled HAProxy's CPU per request (0.15 ->
    # 0.36 ms, measured; OpenSSL 3's locks) while the workers need those cycles.
    nbthread 1
    # Connections at once, idle ones included; one address holds at most per_source of them, so filling this
    # takes max_clients / per_source addresses, and each idle one is closed within the timeouts below.
    maxconn {self.max_clients}
    # A request's head and a body up to this size are held whole before the request may be queued.
    tune.bufsize {self.buffer}
    log stdout format raw local0
    # admin level: a canary changes its weights and maps live through it (deploy/canary.py); 0600 in a 0700 folder
    stats socket {self.path("admin.sock")} mode 600 level admin
    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets
    # TLS 1.2: ECDHE with AEAD ciphers only (no CBC, no RSA key exchange); TLS 1.3's suites are all AEAD.
    ssl-default-bind-ciphers {TLS12_CIPHERS}
{drop}"""  # noqa: E501 (the generated config's own lines: wrapping them would change it)

    def defaults_section(self, forwardfor: bool = True) -> str:
        """Mode, access log format, the timeouts of each phase and HAProxy's own errors as JSON; the client's
        address in X-Forwarded-For unless `forwardfor` is False (HAProxy cannot turn it off per section)."""
        overloaded = f"overloaded, retry after {self.retry_after} s"
        late = f"request not received within {self.request_timeout} s (head) or {self.body_timeout} s (body)"
        silent = f"no answer from TorchServe within {self.server_timeout} s"
        return f"""defaults
    mode http
    log global
    log-format "{LOG_FORMAT}"
{"    option forwardfor" if forwardfor else "    # no X-Forwarded-For"}
    option http-keep-alive
    # a client that gave up (closed) loses its place in the queue: TorchServe never computes unread answers
    option abortonclose
    timeout connect 5s
    # HAProxy 2.6 has no `timeout client-hs` (newer releases have): the TLS handshake, and a TCP connection that never
    # starts one, are bounded by the client timeout (measured: an idle TCP connection closes after it).
    timeout client {self.handshake_timeout}s
    # the request head, counted from the end of the handshake; the body has its own wait (frontend)
    timeout http-request {self.request_timeout}s
    timeout http-keep-alive {self.idle_timeout}s
    timeout server {self.server_timeout}s
    timeout queue {self.queue_timeout}s
    # HAProxy's own answers, in TorchServe's JSON shape: a request that waited timeout queue, a slow client
    http-error {json_reply(503, "Overloaded", overloaded, self.retry_after)}
    http-error {json_reply(408, "RequestTimeout", late)}
    http-error {json_reply(504, "GatewayTimeout", silent)}
"""  # noqa: E501 (the generated config's own lines: wrapping them would change it)

    def frontend_section(self) -> str:
        """The public frontend: TLS and per-address caps, refusals before TorchServe, the KServe v2 routes,
        rate limits, then the lane each request takes."""
        rules = [
            *self.connection_rules(),
            *self.head_refusals(),
            *self.body_rules(),
            *self.oip_rules(),
            *self.rate_limits(),
            *self.lane_choice(),
        ]
        return "frontend public\n" + "".join(f"    {rule}\n" for rule in rules)

    def oip_rules(self) -> list[str]:
        """The public frontend's KServe v2 routes: none here (deploy/haproxy_oip.py's OipConfig adds them)."""
        return []

    def connection_rules(self) -> list[str]:
        """TLS on the public address, the cap on connections in all and per client address."""
        # s an address is remembered after its last use
        table = max(30, self.rate_period, self.explain_period)
        return [
            f"bind {self.bind}:{self.port} ssl crt {self.pem} alpn http/1.1",
            f"maxconn {self.max_clients}",
            f"stick-table type ip size 100k expire {table}s store "
            f"conn_cur,http_req_rate({self.rate_period}s)",
            "tcp-request connection track-sc0 src",
            f"tcp-request connection reject if {{ sc0_conn_cur gt {self.per_source} }}",
        ]

    def head_refusals(self) -> list[str]:
        """What TorchServe must not see, refused on the head: it reads (and form-decodes) whole bodies before
        it checks the key."""
        return [
            "http-request return "
            f"{json_reply(411, 'LengthRequired', 'send a Content-Length (no chunked bodies)')} "
            "if { req.hdr(transfer-encoding) -m found }",
            "http-request return "
            f"{json_reply(413, 'PayloadTooLarge', f'request body over {self.max_body} bytes')} "
            f"if {{ req.hdr_val(content-length) gt {self.max_body} }}",
            *self.media_type_rules(),
            # TorchServe's OpenAPI description (GET /api-description, OPTIONS /) needs no key and names its
            # version. Paths as Netty reads them: percent-decoded; lower-cased to refuse more, never less.
            "acl api_description path,url_dec,lower -m beg /api-description",
            f"http-request return {json_reply(404, 'NotFound', 'no such resource')} if "
            "METH_OPTIONS or api_description",
        ]

    def media_type_rules(self) -> list[str]:
        """Only the media types the handler reads pass, one Content-Type at most, multipart up to max_form."""
        # The media type before any parameter, lower-cased. Netty form-decodes url-encoded bodies (16 MB:
        # 5.7 s of its CPU, +2.1 GB) and multipart ones (capped here).
        return [
            "acl typed req.fhdr_cnt(content-type) gt 0",
            f"acl served req.fhdr(content-type),lower,field(1,;) -m str {' '.join(SERVED_TYPES)}",
            "acl served req.fhdr(content-type),lower,field(1,;) -m beg image/",
            "acl form req.fhdr(content-type),lower,field(1,;) -m str multipart/form-data",
            f"http-request return {json_reply(400, 'BadRequest', 'one Content-Type at most')} "
            "if { req.fhdr_cnt(content-type) gt 1 }",
            f"http-request return {json_reply(415, 'UnsupportedMediaType', UNSUPPORTED)} if typed !served",
            "http-request return "
            f"{json_reply(413, 'PayloadTooLarge', f'multipart body over {self.max_form} bytes')} "
            f"if form {{ req.hdr_val(content-length) gt {self.max_form} }}",
        ]

    def body_rules(self) -> list[str]:
        """The body held whole before the request may queue, and the marks that pick its lane (streamed,
        explain)."""
        # A slow sender gets 408 after body_timeout and never holds a slot. A body larger than the buffer has
        # to stream: the bulk lane. Refusals from here on come after the body, so the connection stays usable
        # for the next request.
        return [
            f"http-request wait-for-body time {self.body_timeout}s",
            "http-request set-var(txn.buffered) req.body_len",
            "acl streamed req.body_size,sub(txn.buffered) gt 0",
            # /explanations/, /v1/models/m:explain, /v2/models/m/explain (a model named *explain* lands here
            # too)
            "acl explain path,url_dec,lower -m sub explanation explain",
            "http-request track-sc1 src table explain if explain",
        ]

    def rate_limits(self) -> list[str]:
        """429 past `rate` requests per client address, and past `explain_rate` explanations (0: no limit)."""
        rules = []
        if self.rate:
            overloaded = f"overloaded, retry after {self.retry_after} s"
            rules.append("http-request return "
                         f"{json_reply(429, 'TooManyRequests', overloaded, self.retry_after)} "
                         f"if {{ sc_http_req_rate(0) gt {self.rate} }}")  # fmt: skip
        if self.explain_rate:
            many = f"at most {self.explain_rate} explanations per {self.explain_period} s per client"
            rules.append(f"http-request return {json_reply(429, 'TooManyRequests', many, self.retry_after)} "
                         f"if explain {{ sc_http_req_rate(1) gt {self.explain_rate} }}")  # fmt: skip
        return rules

    def lane_choice(self) -> list[str]:
        """503 while TorchServe is down; otherwise the backend a request takes: explain, bulk, canary or the
        predictions lane."""
        return [
            "http-request return "
            f"{json_reply(503, 'Unavailable', 'TorchServe is not answering', RETRY_AFTER_DOWN)} "
            "if { nbsrv(torchserve) eq 0 }",
            "use_backend explain if explain",
            "use_backend bulk if streamed",
            # a canary in progress (deploy/canary.py): its model's path, matched whole, splits by weight
            f"use_backend canary if {{ path,map_str({self.path(CANARY_MAP)}) -m found }}",
            "default_backend torchserve",
        ]

    def backend_section(self, name: str, maxconn: int, queue: int) -> str:
        """One lane to TorchServe: its own connection cap and queue (refused at once with 503 when full)."""
        overloaded = json_reply(
            503, "Overloaded", f"overloaded, retry after {self.retry_after} s", self.retry_after
        )
        # one health check
        check = "check inter 2s" if name == "torchserve" else "track torchserve/torchserve"
        rules = [f"http-request return {overloaded} if {{ queue({name}) ge {queue} }}"]
        if name == "explain":  # the explanations each address asked for (the frontend tracks them in sc1)
            period = self.explain_period
            rules.insert(
                0, f"stick-table type ip size 100k expire {max(30, period)}s store http_req_rate({period}s)"
            )
        rules += [
            "# TorchServe's own 503s (queue full, no worker) say nothing about when to come back",
            f"http-response set-header Retry-After {self.retry_after} "
            "if { status 503 } !{ res.hdr(Retry-After) -m found }",
            f"server torchserve 127.0.0.1:{self.backend} maxconn {maxconn} {check}",
        ]
        return f"backend {name}\n" + "".join(f"    {rule}\n" for rule in rules)

    # --- canary (deploy/canary.py drives it live through the admin socket) ---------------------------------
    def canary_sections(self) -> str:
        """A `canary` backend with two servers, `default` and `candidate`, weighted round-robin (so each share
        is exact, not a coin toss), each a loopback frontend that re-issues the request on a path HAProxy
        builds: the candidate's versioned route `/predictions/<model>/<version>` from canary.map (which
        deploy/canary.py fills with validated values), the default's unchanged. Both then take the predictions
        lane, so its cap and queue hold for the split traffic too. The candidate starts at weight 0; the
        config never splits by itself, so a restarted door sends everything to the default. Each 200 answer's
        top-1 label (the first key of the handler's JSON) is counted per server in the backend's table, for
        the class distributions."""
        # abstract names have no permissions: a fixed one could be bound first by any local user, and the
        # door would not start; 128 random bits per config cannot be (a `unix@` socket in the 0700 folder
        # could not be reached by HAProxy once it runs as its own user)
        sock = f"abns@frontdoor-{self.port}-{secrets.token_hex(16)}"
        lines = [
            "backend canary",
            "    balance roundrobin",
            # a side's 500 (a candidate failing on an input the default answers) is tried once more, on the
            # other side: roundrobin skips the server that failed. Only a buffered body can be re-sent, and
            # only the small-body lane (its body held whole) comes here; bulk bodies reach the default alone.
            # The judge still sees the 500: each side's loopback frontend counts what its side answered.
            # Not 503 (a full queue, which anyone can cause before any key is checked, would be retried on
            # the candidate and counted there) and not 504 (a hung request would hold a worker twice).
            "    retries 1",
            "    option redispatch 1",
            "    retry-on conn-failure empty-response 500",
            # longer than the inner hop's queue + server time: a request the candidate never answers ends
            # in the inner frontend's own 504, which its counters (the judge's) see; the outer one's would not
            f"    timeout server {self.canary_wait}s",
            # 2 servers x (classes + a 404 key): 16k keys hold 8k classes (ImageNet's 1000 take 2002)
            "    stick-table type string len 80 size 16k store gpc0",
            "    http-response wait-for-body time 1s if { status 200 }",
            # the first key of the answer's JSON object (the top-1 label: the handler writes it first), split
            # on `"`
            """    http-response set-var(txn.top1) 'res.body,field(2,"\\"")' if { status 200 }""",
            "    http-response set-var(txn.answer) srv_name,concat(/,txn.top1) if { status 200 }",
            # a 404 (the version gone from TorchServe) counts as `server!404`; a client's other 4xx never do
            "    http-response set-var(txn.answer) srv_name,concat(!404) if { status 404 }",
            "    http-response track-sc2 var(txn.answer) if { var(txn.answer) -m found }",
            "    http-response sc-inc-gpc0(2) if { var(txn.answer) -m found }",
            f"    server default {sock}-default weight {CANARY_WEIGHT}",
            f"    server candidate {sock}-candidate weight 0",
            # a shadow run's tee (deploy/shadow.py listens there and sets the weight live): weight 0 at every
            # start, so a restarted door sends nothing to it; a tee that does not accept is retried on the
            # default. A Unix socket in a folder no other user can write: a TCP port, free between runs or
            # after a tee killed with -9, could be bound by any local user and get the users' keys.
            f"    server shadow unix@{self.tee_socket} weight 0 maxconn {SHADOW_MAXCONN}",
        ]
        return "\n".join([*lines, *self.canary_frontends(sock), *self.metrics_frontend()]) + "\n"

    def canary_frontends(self, sock: str) -> list[str]:
        """The canary's two loopback frontends on `sock`: the candidate's adds its version from canary.map to
        the path, both go on to the predictions lane."""
        lines = []
        for side in ("default", "candidate"):
            lines += [
                f"frontend canary_{side}",
                f"    bind {sock}-{side}",
                "    no log",
            ]
            if side == "candidate":  # gone from the map (rolled back meanwhile): the default answers
                mapped = f"path,map_str({self.path(CANARY_MAP)})"
                lines.append(f"    http-request set-path %[path]/%[{mapped}] if {{ {mapped} -m found }}")
            lines.append("    default_backend torchserve")
        return lines

    def metrics_frontend(self) -> list[str]:
        """HAProxy's Prometheus exporter on 127.0.0.1:metrics_port (nothing when metrics_port is 0)."""
        if not self.metrics_port:
            return []
        return [
            "frontend metrics",
            f"    bind 127.0.0.1:{self.metrics_port}",
            "    no log",
            "    http-request use-service prometheus-exporter if { path /metrics }",
            f"    http-request return {json_reply(404, 'NotFound', 'no such resource')}",
        ]
