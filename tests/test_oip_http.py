"""KServe v2 / Open Inference Protocol over HTTP with stock clients (tritonclient.http, sync and async),
against a real TorchServe 0.12 (TS_OPEN_INFERENCE_PROTOCOL=oip, set by deploy/server.py) directly on loopback
and through the HTTPS front door (real HAProxy). Every request here is built and read by tritonclient;
docs/kserve.md has the table.
"""

import asyncio
import base64
import io
import json
import ssl

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from deploy.frontdoor import for_server
from deploy.server import Ports
from tests.test_frontdoor import require_haproxy

# in_order: the tests share one module-scoped server and door
pytestmark = [pytest.mark.slow, pytest.mark.torchserve, pytest.mark.in_order]


@pytest.fixture(scope="module")
def door(server, tmp_path_factory):
    require_haproxy()
    free = Ports.free()  # a server with OIP gRPC on gets a gRPC port at the door too: a free one, never 7443
    folder = str(tmp_path_factory.mktemp("door"))
    d = for_server(server, port=free.inference, grpc_port=free.management, folder=folder)
    d.bind, d.names = "127.0.0.1", ["localhost"]
    try:
        yield d.start()
    finally:
        d.stop()


@pytest.fixture(scope="module", params=["direct", "door"])
def path(request, server, door):
    """(where, a tritonclient.http client, headers with the inference key). tritonclient's infer() writes its
    Inference-Header-Content-Length into the headers dict it is given: each call gets a copy."""
    key = {"Authorization": f"Bearer {server.keys()['inference']['key']}"}
    if request.param == "direct":
        return request.param, httpclient.InferenceServerClient(f"127.0.0.1:{server.ports.inference}"), key
    tls = lambda: ssl.create_default_context(cafile=door.ca)  # noqa: E731
    client = httpclient.InferenceServerClient(f"localhost:{door.port}", ssl=True, ssl_context_factory=tls)
    return request.param, client, key


@pytest.fixture(scope="module")
def jpeg(png):
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(out, "JPEG", quality=95)
    return out.getvalue()


def image_input(payload, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("data", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([payload], dtype=np.object_), binary_data=binary)
    return tensor


def top(result) -> dict:
    return json.loads(result.as_numpy("predictions")[0])


def test_health_and_server_metadata(path):
    _, client, key = path
    assert client.is_server_live(headers=key) and client.is_server_ready(headers=key)
    assert client.get_server_metadata(headers=key)["name"] == "Torchserve"


def test_model_ready_and_metadata(path):
    """TorchServe 0.12 answers neither (404, and 501 for versions): the front door does, after TorchServe
    checked the key. Directly on TorchServe's port they stay missing."""
    where, client, key = path
    if where == "direct":
        assert not client.is_model_ready("my_model", headers=key)
        with pytest.raises(InferenceServerException, match="404"):
            client.get_model_metadata("my_model", headers=key)
        return
    assert client.is_model_ready("my_model", headers=key) and client.is_model_ready(
        "my_model", "1.0", headers=key
    )
    assert not client.is_model_ready("nobody", headers=key)
    meta = client.get_model_metadata("my_model", headers=key)
    assert meta["name"] == "my_model" and meta["versions"] == ["1.0"]
    assert meta["inputs"][0]["datatype"] == "BYTES" and meta["outputs"][0]["name"] == "predictions"
    assert meta["outputs"][0]["parameters"]["classes"] == [str(i) for i in range(10)]
    assert client.get_model_metadata("my_model", "1.0", headers=key) == meta


def test_raw_jpeg_in_binary_gives_the_base64_json_answer(path, jpeg):
    where, client, key = path
    as_json = top(
        client.infer("my_model", [image_input(base64.b64encode(jpeg), binary=False)], headers=dict(key))
    )
    result = client.infer("my_model", [image_input(jpeg, binary=True)], headers=dict(key))
    as_binary = top(result)
    assert as_binary == as_json and next(iter(as_json)) == "3"
    # asked for binary, answered so
    assert "binary_data_size" in result.get_output("predictions")["parameters"]
    json_out = [httpclient.InferRequestedOutput("predictions", binary_data=False)]
    result = client.infer("my_model", [image_input(jpeg, binary=True)], outputs=json_out, headers=dict(key))
    assert top(result) == as_json and "data" in result.get_output("predictions")
    # the versioned route: TorchServe answers it 501, the door re-issues it as /predictions/m/v
    if where == "door":
        result = client.infer(
            "my_model", [image_input(jpeg, binary=True)], model_version="1.0", headers=dict(key)
        )
        assert top(result) == as_json and result.get_response()["model_version"] == "1.0"


def test_async_client(path, server, door, png):
    where, _, key = path
    url = f"127.0.0.1:{server.ports.inference}" if where == "direct" else f"localhost:{door.port}"
    context = ssl.create_default_context(cafile=door.ca) if where == "door" else None

    async def run():
        client = aioclient.InferenceServerClient(url, ssl=where == "door", ssl_context=context)
        try:
            live = await client.is_server_live(headers=key)
            binary = await client.infer("my_model", [image_input(png, binary=True)], headers=dict(key))
            as_json = image_input(base64.b64encode(png), binary=False)
            plain = await client.infer("my_model", [as_json], headers=dict(key))
            return live, top(binary), top(plain)
        finally:
            await client.close()

    live, binary, plain = asyncio.run(run())
    assert live and binary == plain and next(iter(binary)) == "3"


def test_bad_body_is_a_4xx_in_the_v2_error_shape(path):
    _, client, key = path
    with pytest.raises(InferenceServerException) as e:
        client.infer("my_model", [image_input(b"not an image at all", binary=True)], headers=dict(key))
    assert e.value.status() == "415" and "image" in e.value.message()


def test_wrong_key_is_refused_on_every_route(path):
    _, client, key = path
    wrong = {"Authorization": "Bearer wrong"}
    assert not client.is_server_live(headers=wrong) and not client.is_model_ready("my_model", headers=wrong)
    for call in (lambda: client.get_model_metadata("my_model", headers=wrong),
                 lambda: client.infer("my_model", [image_input(b"x", binary=True)],
                                      headers=dict(wrong))):  # fmt: skip
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "400" and "Token Authorization failed" in str(e.value)


def test_explanation_through_the_door(server, door, png):
    """tritonclient has no explain call: its own serialiser builds the v2 body, sent to
    /v2/models/m/explain."""
    body, length = httpclient.InferenceServerClient.generate_request_body([image_input(png, binary=True)])
    headers = {"Authorization": f"Bearer {server.keys()['inference']['key']}"}
    headers["Inference-Header-Content-Length"] = str(length)
    resp = requests.post(
        f"{door.url()}/v2/models/my_model/explain", data=body, headers=headers, verify=door.ca
    )
    assert resp.status_code == 200, resp.text[:300]
    # binary: the client asked (binary_data_output)
    length = int(resp.headers["Inference-Header-Content-Length"])
    explanation = top(httpclient.InferResult.from_response_body(resp.content, header_length=length))
    assert explanation["class"] == "3" and explanation["attributions"]
