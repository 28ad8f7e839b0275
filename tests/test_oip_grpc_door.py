"""KServe v2 gRPC through the front door (TLS, HTTP/2, the door's CA) with the stock client
(tritonclient.grpc), against a real TorchServe 0.12 with ts_open_inference_protocol on and real HAProxy; and
the OIP gRPC proxy started again after a kill -9. docs/kserve.md has the table."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from deploy import oip_grpc_launch, process
from deploy.canary_readings import admin
from deploy.frontdoor import FrontDoor, for_server
from deploy.haproxy_oip import GRPC_PER_SOURCE, GRPC_SERVICE
from deploy.server import Ports
from tests.test_frontdoor import require_haproxy
from tests.test_oip_grpc import check_bad_body, image_input

# in_order: one module-scoped server and door; the restart and stop tests come last
pytestmark = [pytest.mark.slow, pytest.mark.torchserve, pytest.mark.in_order]


@pytest.fixture(scope="module")
def server(store, torchserve_factory, digits):
    return torchserve_factory(store, overrides={"ts_open_inference_protocol": "true"})


@pytest.fixture(scope="module")
def door(server, tmp_path_factory):
    require_haproxy()
    free = Ports.free()
    d = for_server(server, port=free.inference, grpc_port=free.management)
    d.folder, d.bind, d.names = str(tmp_path_factory.mktemp("door")), "127.0.0.1", ["localhost"]
    try:
        yield d.start()
    finally:
        d.stop()


@pytest.fixture(scope="module")
def client(door):
    c = grpcclient.InferenceServerClient(f"localhost:{door.grpc_port}", ssl=True, root_certificates=door.ca)
    yield c
    c.close()


@pytest.fixture(scope="module")
def key(server):
    return {"authorization": f"Bearer {server.keys()['inference']['key']}"}


def top_label(result) -> str:
    return next(iter(json.loads(json.loads(result.as_numpy("predictions")[0]))))


def test_stock_grpc_client_through_the_door(client, key, png):
    assert client.is_server_live(headers=key) and client.is_server_ready(headers=key)
    assert client.get_server_metadata(headers=key).name == "Torchserve"
    assert client.is_model_ready("my_model", headers=key)
    meta = client.get_model_metadata("my_model", headers=key)
    assert meta.name == "my_model" and list(meta.versions) == ["1.0"]
    assert [(t.name, t.datatype) for t in meta.inputs] == [("data", "BYTES")]
    result = client.infer("my_model", [image_input(png)], request_id="d1", headers=key)
    assert result.get_response().id == "d1" and top_label(result) == "3"


def test_bad_body_through_the_door_is_invalid_argument_and_the_worker_survives(server, client, key, png):
    check_bad_body(server, client, key, png)


def test_wrong_or_missing_key_through_the_door_is_permission_denied(client, png):
    for headers in ({"authorization": "Bearer wrong"}, {}):
        with pytest.raises(InferenceServerException) as e:
            client.infer("my_model", [image_input(png)], headers=headers)
        assert e.value.status() == "StatusCode.PERMISSION_DENIED", headers
        with pytest.raises(InferenceServerException) as e:
            client.get_model_metadata("my_model", headers=headers)
        assert e.value.status() == "StatusCode.PERMISSION_DENIED", headers


def test_other_methods_are_answered_by_the_door_never_forwarded(door, key):
    with open(door.ca, "rb") as f:
        channel = grpc.secure_channel(f"localhost:{door.grpc_port}", grpc.ssl_channel_credentials(f.read()))
    paths = [
        "/inference.GRPCInferenceService/RepositoryIndex",  # a standard method the proxy does not serve
        "/org.pytorch.serve.grpc.openinference.GRPCInferenceService/ServerLive",  # TorchServe's own name
        "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping",
        "/inference.GRPCInferenceService/ServerLive?x=1",  # review: the query was passed on, unread
    ]
    with channel:
        for path in paths:
            call = channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)
            with pytest.raises(grpc.RpcError) as e:
                call(b"", metadata=tuple(key.items()), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "no such method" in e.value.details()
    with open(door.log) as f:
        lines = [line for line in f if "HTTP/2.0" in line]
    for path in paths:  # refused in the frontend: no server was chosen
        assert any(path in line and "server=<NOSRV>" in line for line in lines), path


def test_one_address_holds_at_most_its_share_of_calls_however_many_streams(tmp_path):
    """Review: per_source counts connections, and one HTTP/2 connection carries many calls: one address filled
    the proxy's 32 slots and the queue. Here a backend that never answers holds every call that reaches it."""
    require_haproxy()
    free = Ports.free()
    with socket.socket() as silent:  # accepts (the door's check passes), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        door = FrontDoor(
            backend=free.inference, grpc_backend=silent.getsockname()[1], grpc_port=free.management,
            port=free.metrics, folder=str(tmp_path / "door"), bind="127.0.0.1", names=["localhost"],
        ).start()  # fmt: skip
        try:
            with open(door.ca, "rb") as f:
                creds = grpc.ssl_channel_credentials(f.read())
            with grpc.secure_channel(f"localhost:{door.grpc_port}", creds) as channel:  # one connection
                live = channel.unary_unary(
                    f"/{GRPC_SERVICE}/ServerLive", request_serializer=bytes, response_deserializer=bytes
                )
                held = [live.future(b"", timeout=60) for _ in range(GRPC_PER_SOURCE)]
                process.wait_until(
                    lambda: door_calls(door) >= GRPC_PER_SOURCE, 30, "the held calls at the door"
                )
                with pytest.raises(grpc.RpcError) as e:
                    live(b"", timeout=30)
                for call in held:
                    call.cancel()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "calls at once" in e.value.details()
        finally:
            door.stop()


def door_calls(door) -> int:
    """Calls from 127.0.0.1 that the door's gRPC frontend tracks now (`use=` of its per-address table)."""
    found = re.search(r"key=127\.0\.0\.1 use=(\d+)", admin(door, "show table oip_grpc_calls"))
    return int(found[1]) if found else 0


# binds the port as soon as it can (as another user), says so and lets go; else runs until it is stopped
SQUATTER = r"""
import socket, sys, time
print("ready", flush=True)
while True:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        s.close()
        time.sleep(0.002)
        continue
    s.close()
    print("bound", flush=True)
    break
"""


def test_the_proxy_is_back_after_kill_9_and_no_other_user_took_its_port(server, door, client, key, png):
    """Review: the proxy's port was free between its death and the restart (and before its start), and a
    local user who bound it got the clients' keys; the supervisor now holds it (--hold-port)."""
    supervisors, proxies = oip_grpc_launch.processes(server)
    assert len(supervisors) == 1 and len(proxies) == 1
    squatter = subprocess.Popen(
        [sys.executable, "-c", SQUATTER, str(server.ports.oip_grpc)],
        user="nobody",
        stdout=subprocess.PIPE,
        text=True,
    )
    assert squatter.stdout.readline().strip() == "ready"
    os.kill(proxies[0].pid, signal.SIGKILL)
    proxies[0].wait(10)

    def back() -> bool | str:
        found = oip_grpc_launch.processes(server)[1]
        if not found:
            return "no proxy yet"
        try:
            return top_label(client.infer("my_model", [image_input(png)], headers=key)) == "3"
        except InferenceServerException as e:  # restarting, or the door still counts it down
            return e.message()[:80]

    try:
        process.wait_until(back, 60, "a stock client call through the door after kill -9 of the proxy")
    finally:
        squatter.terminate()
        said = squatter.communicate(timeout=10)[0]
    assert "bound" not in said  # nobody bound the port in the window, which the restart took 1 s or more
    assert oip_grpc_launch.processes(server)[1][0].pid != proxies[0].pid
    direct = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.oip_grpc}")
    assert direct.is_model_ready("my_model", headers=key)
    direct.close()


def test_stop_stops_the_proxy_and_its_supervisor(server):
    assert oip_grpc_launch.processes(server) != ([], [])
    server.stop()
    assert oip_grpc_launch.processes(server) == ([], [])


def test_the_door_has_a_grpc_listener_only_with_the_proxy(tmp_path):
    plain = FrontDoor(backend=9, folder=str(tmp_path)).haproxy_config()
    assert "frontend oip_grpc" not in plain and "proto h2" not in plain
    text = FrontDoor(backend=9, folder=str(tmp_path), grpc_backend=7, grpc_port=17443).haproxy_config()
    grpc_part = text[text.index("frontend oip_grpc") :]
    assert ":17443 ssl crt" in grpc_part and "alpn h2" in grpc_part and "127.0.0.1:7 proto h2" in grpc_part
    assert "track-sc0 src table public" in grpc_part and "del-header x-forwarded-for" in grpc_part
    assert "option forwardfor" not in text[text.rindex("defaults") :]
