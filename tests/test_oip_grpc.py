"""KServe v2 / Open Inference Protocol over gRPC with the stock client (tritonclient.grpc), through
deploy/oip_grpc.py, which deploy/server.py starts beside a real TorchServe 0.12 with
ts_open_inference_protocol on. Every request is built and read by tritonclient; the unit tests at the end
run the proxy against a fake TorchServe service (no TorchServe)."""

import json
import socket
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from deploy import oip_grpc, supervise
from deploy.server import Ports


@pytest.fixture(scope="module")
def server(store, torchserve_factory, digits):
    return torchserve_factory(store, overrides={"ts_open_inference_protocol": "true"})


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.ports.oip_grpc}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def key(server):
    return {"authorization": f"Bearer {server.keys()['inference']['key']}"}


def image_input(payload: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("data", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([payload], dtype=np.object_))  # raw image bytes
    return tensor


def worker_pid(server):
    return server.request("GET", "management", "/models/my_model").json()[0]["workers"][0]["pid"]


@pytest.mark.slow
@pytest.mark.torchserve
def test_stock_grpc_client_health_metadata_and_infer(server, client, key, png):
    assert client.is_server_live(headers=key) and client.is_server_ready(headers=key)
    assert client.get_server_metadata(headers=key).name
    assert client.is_model_ready("my_model", headers=key)
    meta = client.get_model_metadata("my_model", headers=key)
    assert meta.name == "my_model" and list(meta.versions) == ["1.0"]
    assert [(t.name, t.datatype) for t in meta.inputs] == [("data", "BYTES")]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("predictions", "BYTES")]
    result = client.infer("my_model", [image_input(png)], request_id="r1", headers=key)
    assert result.get_response().id == "r1"
    prediction = json.loads(json.loads(result.as_numpy("predictions")[0]))
    assert next(iter(prediction)) == "3"


@pytest.mark.slow
@pytest.mark.torchserve
def test_stock_grpc_client_bad_body_is_an_error_and_the_worker_survives(server, client, key, png):
    check_bad_body(server, client, key, png)


def check_bad_body(server, client, key, png):
    """A bad image: INVALID_ARGUMENT with the handler's message; the worker lives on and answers next."""
    pid = worker_pid(server)
    with pytest.raises(InferenceServerException) as e:
        client.infer("my_model", [image_input(b"not an image at all")], headers=key)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "image" in e.value.message()
    assert worker_pid(server) == pid
    assert client.infer("my_model", [image_input(png)], headers=key).as_numpy("predictions") is not None


@pytest.mark.slow
@pytest.mark.torchserve
def test_stock_grpc_client_wrong_key_is_refused(client, png):
    wrong = {"authorization": "Bearer wrong"}
    with pytest.raises(InferenceServerException) as e:
        client.infer("my_model", [image_input(png)], headers=wrong)
    assert e.value.status() == "StatusCode.PERMISSION_DENIED"
    calls = [client.is_server_live, client.is_server_ready, client.get_server_metadata]
    calls += [lambda headers: client.is_model_ready("my_model", headers=headers)]
    calls += [lambda headers: client.get_model_metadata("my_model", headers=headers)]
    for call in calls:  # TorchServe checks the key on every OIP RPC; missing is refused like wrong
        for headers in (wrong, {}):
            with pytest.raises(InferenceServerException) as e:
                call(headers=headers)
            assert e.value.status() == "StatusCode.PERMISSION_DENIED" and "Token" in e.value.message()


# --- units: the proxy against a fake TorchServe OIP service -----------------------------------------------


class FakeTorchServe:
    """TorchServe's OIP service name, recording each call's metadata and request."""

    def __init__(self):
        self.seen: list[tuple[str, dict, object]] = []
        self.lock = threading.Lock()
        self.proxy_port = 0  # the proxy's, set by the fixture

    def handler(self, name):
        req_type, resp_type = oip_grpc.RPCS[name]

        def call(req, context):
            with self.lock:
                self.seen.append((name, dict(context.invocation_metadata()), req))
            if name == "ModelInfer":
                resp = pb.ModelInferResponse(model_name=req.model_name, id=req.id)
                out = resp.outputs.add(name="predictions", datatype="BYTES", shape=[1])
                out.contents.bytes_contents.append(json.dumps(json.dumps({"3": 1.0})).encode())
                return resp
            return resp_type(live=True) if name == "ServerLive" else resp_type()

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=req_type.FromString, response_serializer=resp_type.SerializeToString
        )


@pytest.fixture
def proxied():
    fake, ports = FakeTorchServe(), Ports.free()
    upstream = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service = oip_grpc.TORCHSERVE.strip("/")
    handlers = {n: fake.handler(n) for n in oip_grpc.RPCS}
    upstream.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    upstream.add_insecure_port(f"127.0.0.1:{ports.grpc_inference}")
    upstream.start()
    proxy = oip_grpc.serve(
        f"127.0.0.1:{ports.oip_grpc}", f"127.0.0.1:{ports.grpc_inference}", {}, 64 * 1024, 4
    )
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{ports.oip_grpc}")
    fake.proxy_port = ports.oip_grpc
    try:
        yield fake, client
    finally:
        client.close()
        proxy.stop(None)
        upstream.stop(None)


def test_only_the_authorization_metadata_is_passed_on(proxied):
    fake, client = proxied
    headers = {"authorization": "Bearer k", "x-forwarded-for": "10.0.0.1", "cookie": "a=b"}
    assert client.is_server_live(headers=headers)
    result = client.infer("my_model", [image_input(b"png bytes")], request_id="r9", headers=headers)
    assert result.get_response().id == "r9"
    for name, metadata, _ in fake.seen:
        assert {k for k in metadata if not k.startswith(("grpc-", "user-agent"))} == {"authorization"}, name
        assert metadata["authorization"] == "Bearer k"
    sent = fake.seen[-1][2]  # rebuilt: the raw (length-prefixed) contents became one BYTES element
    assert list(sent.inputs[0].contents.bytes_contents) == [b"png bytes"] and not sent.raw_input_contents


def test_an_oversize_message_is_refused_before_it_reaches_torchserve(proxied):
    fake, client = proxied
    with pytest.raises(InferenceServerException) as e:
        client.infer("my_model", [image_input(b"x" * (128 * 1024))], headers={"authorization": "Bearer k"})
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    many = grpcclient.InferInput("data", [5], "BYTES")  # the proxy in `proxied` takes 4 images per request
    many.set_data_from_numpy(np.array([b""] * 5, dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        client.infer("my_model", [many])
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "over 4 elements" in e.value.message()
    assert fake.seen == []


def test_a_model_name_that_is_not_plain_is_refused(proxied):
    fake, client = proxied
    with pytest.raises(InferenceServerException) as e:
        client.infer("../my_model", [image_input(b"png")])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "plain name" in e.value.message()
    assert fake.seen == []


def test_no_other_socket_can_share_the_proxys_port(proxied):
    """Review: gRPC turns SO_REUSEPORT on by default, so any process of the proxy's user (a model's handler
    code) could bind its port beside it and take a share of the clients and their keys."""
    fake, _ = proxied
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError):
            s.bind(("127.0.0.1", fake.proxy_port))


# as another user: tries to bind the port in each way a squatter might; prints what happened to each
BINDS = r"""
import socket, sys
for opts in [(), (socket.SO_REUSEPORT,), (socket.SO_REUSEADDR,), (socket.SO_REUSEPORT, socket.SO_REUSEADDR)]:
    s = socket.socket()
    for o in opts:
        s.setsockopt(socket.SOL_SOCKET, o, 1)
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
        print("bound", opts)
    except OSError as e:
        print("refused", e.errno)
    s.close()
"""


def other_user_binds(port: int) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", BINDS, str(port)], user="nobody", capture_output=True, text=True, timeout=60
    )
    return done.stdout.splitlines()


def test_a_held_port_is_closed_to_other_users_and_open_to_the_proxy():
    """Review: between a death of the proxy and its restart (and before its start) another local user could
    bind its port and collect the clients' keys. deploy/supervise.py --hold-port keeps it bound meanwhile."""
    port = Ports.free().oip_grpc
    holder = supervise.hold(f"127.0.0.1:{port}")
    try:
        assert other_user_binds(port) == ["refused 98"] * 4  # EADDRINUSE, whatever the socket options
        proxy = oip_grpc.serve(f"127.0.0.1:{port}", "127.0.0.1:9", {}, 1024, 4, held=True)  # binds beside it
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                pass  # the proxy, not the holder, listens
        finally:
            proxy.stop(None)
        assert other_user_binds(port) == ["refused 98"] * 4  # the proxy is gone; the port is still held
    finally:
        holder.close()


def test_a_request_id_that_is_not_printable_ascii_is_refused(proxied):
    fake, client = proxied
    with pytest.raises(InferenceServerException) as e:
        client.infer("my_model", [image_input(b"png")], request_id="r\n9", headers={"authorization": "k"})
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "id:" in e.value.message()
    assert fake.seen == []
