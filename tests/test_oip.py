"""KServe v2 / Open Inference Protocol against a real TorchServe 0.12.

What works: the v2 JSON body on /predictions/my_model and on TorchServe's /v2/models/my_model/infer,
and OIP gRPC (`ts_open_inference_protocol=true`) with v2 messages sent to the service name
TorchServe registers. What does not: a stock v2 client (tritonclient's InferenceServerClient),
because TorchServe registers the service as org.pytorch.serve.grpc.openinference.GRPCInferenceService
instead of the standard inference.GRPCInferenceService (see docs/kserve.md).
"""

import base64
import json

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb

# in_order: the tests share one module-scoped server (or door) and build on each other's effects
pytestmark = [pytest.mark.slow, pytest.mark.torchserve, pytest.mark.in_order]

TS_OIP_SERVICE = "/org.pytorch.serve.grpc.openinference.GRPCInferenceService/"


@pytest.fixture(scope="module")
def server(store, torchserve_factory, digits):
    return torchserve_factory(store, overrides={"ts_open_inference_protocol": "true"})


def infer_request(payload: bytes) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="my_model", id="req-1")
    tensor = req.inputs.add()
    tensor.name, tensor.datatype = "data", "BYTES"
    tensor.shape.append(1)
    tensor.contents.bytes_contents.append(payload)  # raw image bytes, as v2 BYTES tensors carry them
    return req


def grpc_infer(server, req, key=None):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc_inference}")
    call = channel.unary_unary(
        TS_OIP_SERVICE + "ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    metadata = [("authorization", f"Bearer {key or server.keys()['inference']['key']}")]
    try:
        return call(req, metadata=metadata, timeout=60)
    finally:
        channel.close()


def worker_pid(server):
    return server.request("GET", "management", "/models/my_model").json()[0]["workers"][0]["pid"]


def test_v2_json_body_on_predictions_and_v2_route(server, png):
    body = {
        "id": "abc",
        "inputs": [
            {"name": "data", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png).decode()]}
        ],
    }
    for path in ("/predictions/my_model", "/v2/models/my_model/infer"):
        resp = server.request("POST", "inference", path, json=body)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["id"] == "abc" and out["model_name"] == "my_model"
        assert out["outputs"][0]["name"] == "predictions" and out["outputs"][0]["shape"] == [1]
        assert next(iter(json.loads(out["outputs"][0]["data"][0]))) == "3"


def test_bad_v2_json_body_is_a_4xx_with_message(server):
    body = {
        "id": "x",
        "inputs": [{"name": "data", "shape": [1], "datatype": "BYTES", "data": ["bm90IGFuIGltYWdl"]}],
    }
    resp = server.request("POST", "inference", "/v2/models/my_model/infer", json=body)
    assert resp.status_code == 415
    assert "image" in resp.json()["message"]


def test_oip_grpc_infer_with_v2_messages(server, png):
    resp = grpc_infer(server, infer_request(png))
    assert resp.model_name == "my_model" and resp.id == "req-1"
    out = resp.outputs[0]
    assert out.name == "predictions" and out.datatype == "BYTES" and list(out.shape) == [1]
    prediction = json.loads(json.loads(out.contents.bytes_contents[0]))  # a JSON string inside a JSON string
    assert next(iter(prediction)) == "3"


def test_oip_grpc_bad_input_answers_an_error_tensor_and_the_worker_survives(server, png):
    pid = worker_pid(server)
    resp = grpc_infer(server, infer_request(b"not an image at all"))
    assert resp.outputs[0].name == "error"
    assert "image" in json.loads(json.loads(resp.outputs[0].contents.bytes_contents[0]))["message"]
    # a body without the v2 keys would have crashed the frontend's response path
    assert worker_pid(server) == pid
    assert grpc_infer(server, infer_request(png)).outputs[0].name == "predictions"


def test_oip_grpc_needs_the_token(server, png):
    with pytest.raises(grpc.RpcError) as e:
        grpc_infer(server, infer_request(png), key="wrong")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_stock_v2_client_is_not_served_by_torchserve_0_12(server):
    """Documents the incompatibility: tritonclient calls inference.GRPCInferenceService, which
    TorchServe 0.12 does not register. If this starts passing, TorchServe fixed it: update docs/kserve.md."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.ports.grpc_inference}")
    headers = {"authorization": f"Bearer {server.keys()['inference']['key']}"}
    with pytest.raises(InferenceServerException, match="UNIMPLEMENTED"):
        client.is_server_live(headers=headers)
