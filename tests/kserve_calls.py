"""KServe's own Python client (kserve 0.21.0) making every call of tests/test_kserve_client.py, run by
.venv-kserve's Python (requirements-kserve.txt: kserve cannot share .venv's packages). Only KServe's client
objects build and read the requests: InferenceRESTClient (v2 and v1), InferenceGRPCClient and, for the two
metadata calls that client lacks, KServe's generated gRPC stub.

    .venv-kserve/bin/python tests/kserve_calls.py SPEC.json

SPEC: {"rest": base URL, "ca": the door's CA or null (TLS, REST or gRPC), "grpc": "host:port" or null, "key":
the inference key, "image": a PNG's path, "model": the model's name}. Prints one JSON object: each call's
name -> {"value": ...} or {"error": {"type", "status", "body"}}.
"""

import asyncio
import base64
import json
import ssl
import sys

import grpc
import httpx
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

NOT_AN_IMAGE = b"not an image at all"
BINARY_OUT = {"binary_data_output": True}  # outputs in the binary extension (KServe's client reads them)


def outcome_of(error: Exception) -> dict:
    """The error as the client raised it: its type, the HTTP status or gRPC code, and the body or details."""
    if isinstance(error, httpx.HTTPStatusError):
        try:
            body = error.response.json()
        except ValueError:
            body = error.response.text
        status = error.response.status_code
        return {"type": type(error).__name__, "status": status, "body": body, "message": str(error)}
    if isinstance(error, grpc.RpcError):
        return {"type": "RpcError", "status": error.code().name, "body": error.details()}
    return {"type": type(error).__name__, "status": None, "body": str(error)}


async def outcome(call) -> dict:
    try:
        return {"value": await call}
    except Exception as e:  # noqa: BLE001 (the test judges every error)
        return {"error": outcome_of(e)}


def image_request(model: str, payload: bytes, binary: bool, **kwargs) -> InferRequest:
    tensor = InferInput("data", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([payload], dtype=np.object_), binary_data=binary)
    return InferRequest(model_name=model, infer_inputs=[tensor], **kwargs)


def answer(response) -> dict:
    """The v2 answer as JSON: its model and version, and each output's name, datatype and data as text."""
    outputs = []
    for out in response.outputs:
        data = [d.decode() if isinstance(d, bytes) else d for d in out.as_numpy().tolist()]
        outputs.append({"name": out.name, "datatype": out.datatype, "data": data})
    return {"id": response.id, "model_name": response.model_name, "model_version": response.model_version,
            "outputs": outputs}  # fmt: skip


async def answered(call):
    return answer(await call)


async def rest_calls(spec: dict, png: bytes) -> dict:
    """InferenceRESTClient, v2 then v1, with the key and with a wrong one."""
    base, model, key = spec["rest"], spec["model"], {"Authorization": f"Bearer {spec['key']}"}
    wrong = {"Authorization": "Bearer wrong"}
    verify = ssl.create_default_context(cafile=spec["ca"]) if spec["ca"] else True
    v2 = InferenceRESTClient(RESTConfig(protocol="v2", verify=verify, timeout=60))
    v1 = InferenceRESTClient(RESTConfig(protocol="v1", verify=verify, timeout=60))
    b64 = base64.b64encode(png)
    instances = {"instances": [{"data": b64.decode()}]}
    out = {"rest_methods": {"value": sorted(m for m in dir(v2) if not m.startswith("_"))}}

    def infer(payload: bytes, binary: bool = True, headers: dict = key, **kwargs):
        return v2.infer(base, image_request(model, payload, binary, **kwargs), model, headers=dict(headers))

    try:
        calls = {
            "live": v2.is_server_live(base, headers=key),
            "ready": v2.is_server_ready(base, headers=key),
            "model_ready": v2.is_model_ready(base, model, headers=key),
            "model_ready_unknown": v2.is_model_ready(base, "nobody", headers=key),
            "infer_binary": answered(infer(png)),
            "infer_json": answered(infer(b64, binary=False)),
            "infer_binary_output": answered(infer(png, parameters=BINARY_OUT)),
            "infer_bad_body": infer(NOT_AN_IMAGE),
            "v1_predict": v1.infer(base, instances, model, headers=key),
            "v1_explain": v1.explain(base, model, instances, headers=key),
            "wrong_key_live": v2.is_server_live(base, headers=wrong),
            "wrong_key_ready": v2.is_server_ready(base, headers=wrong),
            "wrong_key_model_ready": v2.is_model_ready(base, model, headers=wrong),
            "wrong_key_infer": infer(png, headers=wrong),
            "wrong_key_v1_predict": v1.infer(base, instances, model, headers=wrong),
        }
        for name, call in calls.items():  # one at a time: the door's lanes are small
            out[name] = await outcome(call)
    finally:
        await v2.close()
        await v1.close()
    return out


async def grpc_calls(spec: dict, png: bytes) -> dict:
    """InferenceGRPCClient (TLS with the door's CA when `ca` is given) and KServe's stub for metadata."""
    url, model, ca = spec["grpc"], spec["model"], spec.get("ca")
    key, wrong = [("authorization", f"Bearer {spec['key']}")], [("authorization", "Bearer wrong")]
    client = InferenceGRPCClient(url, timeout=60, use_ssl=bool(ca), root_certificates=ca)
    out = {"grpc_methods": {"value": sorted(m for m in dir(client) if not m.startswith("_"))}}
    if ca:
        with open(ca, "rb") as f:
            channel = grpc.aio.secure_channel(url, grpc.ssl_channel_credentials(f.read()))
    else:
        channel = grpc.aio.insecure_channel(url)
    stub = GRPCInferenceServiceStub(channel)

    async def server_metadata(metadata):
        reply = await stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata, timeout=60)
        return {"name": reply.name, "version": reply.version}

    async def model_metadata(metadata):
        reply = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model), metadata=metadata, timeout=60)
        tensors = lambda ts: [[t.name, t.datatype] for t in ts]  # noqa: E731
        return {"name": reply.name, "versions": list(reply.versions), "platform": reply.platform,
                "inputs": tensors(reply.inputs), "outputs": tensors(reply.outputs)}  # fmt: skip

    try:
        calls = {
            "live": client.is_server_live(headers=key),
            "ready": client.is_server_ready(headers=key),
            "model_ready": client.is_model_ready(model, headers=key),
            "server_metadata": server_metadata(key),
            "model_metadata": model_metadata(key),
            "infer": answered(client.infer(image_request(model, png, True, request_id="k1"), headers=key)),
            "infer_bad_body": client.infer(image_request(model, NOT_AN_IMAGE, True), headers=key),
            "wrong_key_live": client.is_server_live(headers=wrong),
            "wrong_key_model_ready": client.is_model_ready(model, headers=wrong),
            "wrong_key_model_metadata": model_metadata(wrong),
            "wrong_key_infer": client.infer(image_request(model, png, True), headers=wrong),
        }
        for name, call in calls.items():
            out[name] = await outcome(call)
    finally:
        await client.close()
        await channel.close()
    return out


async def main(spec: dict) -> dict:
    with open(spec["image"], "rb") as f:
        png = f.read()
    if spec.get("grpc"):
        return await grpc_calls(spec, png)
    return await rest_calls(spec, png)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(json.dumps(asyncio.run(main(json.load(f))), default=repr))
