"""KServe v2 / Open Inference Protocol over gRPC for stock clients: a small gRPC server that serves
`inference.GRPCInferenceService` (the name tritonclient and KServe call) and re-issues each call to TorchServe
0.12's own OIP service, which it registers as `org.pytorch.serve.grpc.openinference.GRPCInferenceService`.

Each request is parsed whole into tritonclient's protobuf message (at most `max_message` bytes: TorchServe's
`max_request_size`, larger messages get RESOURCE_EXHAUSTED before they are parsed), its model name and version
checked with the front door's plain-name rule, and a NEW request is built from those values only: for
ModelInfer the request id and the first input's name and elements (the handler reads nothing else;
tritonclient sends BYTES in `raw_input_contents`, length-prefixed, split with model_src/oip.py's bounded
parser).
Only the client's `authorization` metadata goes on, so TorchServe judges the key on every call. ModelMetadata
is answered from the archives' metadata (frontdoor.oip_models, written by deploy/server.py to a file this
process reads) once TorchServe's ModelReady says the model is there with that key. An answer with an `error`
output tensor (the handler's way of reporting bad input over gRPC) becomes a gRPC error with its message.

    python -m deploy.oip_grpc --listen 127.0.0.1:7072 --upstream 127.0.0.1:7070 --models run/oip_models.json
"""

import argparse
import json
import sys
import threading
import types
from concurrent import futures
from importlib.metadata import version

import grpc
from tritonclient.grpc import service_pb2 as pb

from deploy.frontdoor import SAFE_NAME
from deploy.guard import follow
from deploy.haproxy_oip import GRPC_METHODS, GRPC_SERVICE
from model_src.image_checks import InputError
from model_src.oip import elements, pack

SERVICE = GRPC_SERVICE  # what stock clients call
TORCHSERVE = "/org.pytorch.serve.grpc.openinference.GRPCInferenceService/"  # what TorchServe 0.12 registers
MAX_KEY = 512  # characters of an authorization value
UPSTREAM_TIMEOUT = 60.0  # s: TorchServe's responseTimeout (30 s) with room for a queue
# the handler's HTTP status inside an `error` tensor -> the gRPC code a client sees
STATUS_CODES = {
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# name: (request, response) of each method the proxy serves (the door lets only these through)
RPCS = {name: (getattr(pb, f"{name}Request"), getattr(pb, f"{name}Response")) for name in GRPC_METHODS}


class Refused(Exception):
    """A request this proxy will not re-issue: the gRPC code and the message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def plain(value: str, what: str, optional: bool = False) -> str:
    """`value` if it is a plain name (the front door's rule; '' allowed when optional), else Refused."""
    if (optional and value == "") or SAFE_NAME.fullmatch(value):
        return value
    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{what} must be a plain name, got {value[:64]!r}")


def key_metadata(context) -> list[tuple[str, str]]:
    """The client's `authorization` metadata, alone (at most one, printable, bounded): what goes upstream."""
    keys = [v for k, v in context.invocation_metadata() if k == "authorization"]
    if len(keys) > 1 or any(not isinstance(v, str) or len(v) > MAX_KEY or not v.isprintable() for v in keys):
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"one printable authorization value of at most {MAX_KEY} characters",
        )
    return [("authorization", keys[0])] if keys else []


def infer_request(req: pb.ModelInferRequest, max_elements: int) -> pb.ModelInferRequest:
    """A new ModelInferRequest from the values the handler reads: model, version, id, the first input's name
    and its BYTES elements (from `contents` or tritonclient's length-prefixed `raw_input_contents`), at most
    `max_elements` of them (RESOURCE_EXHAUSTED past that)."""
    if not req.inputs:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "ModelInfer needs one BYTES input (encoded images)")
    first = req.inputs[0]
    if first.datatype != "BYTES":
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT, f"input datatype must be BYTES, got {first.datatype!r:.40}"
        )
    try:
        if req.raw_input_contents:
            data = elements(memoryview(req.raw_input_contents[0]), max_elements)
        else:
            data = list(first.contents.bytes_contents)
            if len(data) > max_elements:
                raise InputError(f"over {max_elements} elements in one BYTES tensor", 413)
    except InputError as e:
        raise Refused(code_of(e.status), str(e)) from None
    new = pb.ModelInferRequest(
        model_name=plain(req.model_name, "model_name"),
        model_version=plain(req.model_version, "model_version", optional=True),
        id=request_id(req.id),
    )
    tensor = new.inputs.add()
    tensor.name, tensor.datatype = plain(first.name, "input name"), "BYTES"
    tensor.shape.append(len(data))
    tensor.contents.bytes_contents.extend(data)
    return new


def request_id(value: str) -> str:
    """A client's request id, passed on only when it is at most 256 printable ASCII characters (the answer
    echoes it); Refused otherwise."""
    if len(value) > 256 or not (value.isascii() and value.isprintable()):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "id: at most 256 printable ASCII characters")
    return value


def code_of(status: int) -> grpc.StatusCode:
    """The gRPC code for the handler's HTTP status: STATUS_CODES, else INVALID_ARGUMENT (4xx) or INTERNAL."""
    return STATUS_CODES.get(
        status, grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL
    )


def error_of(resp: pb.ModelInferResponse) -> Refused | None:
    """The handler's `error` output tensor (its bad-input answer over gRPC) as a Refused, else None."""
    for out in resp.outputs:
        if out.name == "error":
            try:
                body = json.loads(json.loads(out.contents.bytes_contents[0]))
                status, message = int(body.get("code", 400)), str(body.get("message", body))
            except (ValueError, IndexError, TypeError, AttributeError):
                status, message = 400, "the model refused the input"
            return Refused(code_of(status), message[:1000])
    return None


class Proxy:
    """The RPCs: each parses, validates, re-issues to TorchServe and answers (or aborts with a code)."""

    def __init__(self, upstream: str, models: dict[str, dict], max_message: int, max_elements: int):
        options = [
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
        ]
        self.channel = grpc.insecure_channel(upstream, options=options)
        self.models, self.max_elements = models, max_elements
        self.calls = {
            name: self.channel.unary_unary(
                TORCHSERVE + name,
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString,
            )
            for name, (req, resp) in RPCS.items()
        }

    def upstream(self, name: str, request, context):
        """TorchServe's answer to `request` with the client's key; its error code and message on failure."""
        remaining = context.time_remaining()
        timeout = min(remaining, UPSTREAM_TIMEOUT) if remaining is not None else UPSTREAM_TIMEOUT
        try:
            return self.calls[name](request, metadata=key_metadata(context), timeout=timeout)
        except grpc.RpcError as e:
            raise Refused(e.code(), f"TorchServe: {e.details()}") from None

    def rebuild(self, name: str, req):
        """The new request for TorchServe, from `req`'s validated values only."""
        if name == "ModelInfer":
            return infer_request(req, self.max_elements)
        if name == "ServerMetadata":
            return pb.ServerReadyRequest()
        if name in ("ModelReady", "ModelMetadata"):
            model = plain(req.name, "model name")
            return pb.ModelReadyRequest(
                name=model, version=plain(req.version, "model version", optional=True)
            )
        return RPCS[name][0]()  # live, ready, server metadata: nothing to pass on

    def answer(self, name: str, req, context):
        """One RPC: re-issued, checked, answered."""
        new = self.rebuild(name, req)
        if name == "ModelMetadata":  # TorchServe's own lacks the archive's tensors: ours, once it is ready
            ready = self.upstream("ModelReady", new, context)
            meta = self.models.get(new.name)
            if not ready.ready or meta is None:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"model {new.name!r} is not served")
            return metadata_response(meta)
        if name == "ServerMetadata":  # unimplemented in 0.12: its HTTP /v2 answer, after a key-checked call
            self.upstream("ServerReady", new, context)
            return pb.ServerMetadataResponse(name="Torchserve", version=version("torchserve"))
        resp = self.upstream(name, new, context)
        if name != "ModelInfer":
            return resp
        if (refused := error_of(resp)) is not None:
            raise refused
        return infer_response(resp)

    def handler(self, name: str):
        """The grpc method handler of RPC `name`."""
        req_type, resp_type = RPCS[name]

        def call(req, context):
            try:
                return self.answer(name, req, context)
            except Refused as e:
                context.abort(e.code, e.message)

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=req_type.FromString, response_serializer=resp_type.SerializeToString
        )


def infer_response(resp: pb.ModelInferResponse) -> pb.ModelInferResponse:
    """TorchServe's answer the way stock clients read BYTES outputs: each in `raw_output_contents`,
    length-prefixed (tritonclient's numpy 2 reading of `contents.bytes_contents` fails)."""
    new = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version, id=resp.id)
    for out in resp.outputs:
        new.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        new.raw_output_contents.append(pack(list(out.contents.bytes_contents)))
    return new


def metadata_response(meta: dict) -> pb.ModelMetadataResponse:
    """A ModelMetadataResponse from the archive's v2 metadata (frontdoor.oip_models' shape)."""
    resp = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
    for kind, target in (("inputs", resp.inputs), ("outputs", resp.outputs)):
        for t in meta[kind]:
            target.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    return resp


def serve(
    listen: str,
    upstream: str,
    models: dict[str, dict],
    max_message: int,
    max_elements: int,
    workers: int = 8,
    held: bool = False,
) -> grpc.Server:
    """A started gRPC server on `listen` (host:port) re-issuing to TorchServe's OIP gRPC at `upstream`;
    OSError when the port cannot be bound. held: the port is held by deploy/supervise.py --hold-port."""
    options = [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        # gRPC sets SO_REUSEPORT by default, which lets any process of the same user bind the port beside us.
        # Off, unless our supervisor holds the port (then it must be on to bind beside the holder, whose
        # SO_REUSEPORT socket keeps every other user off the port, between restarts too).
        ("grpc.so_reuseport", 1 if held else 0),
        ("grpc.max_concurrent_streams", 4 * workers),  # per connection
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=options,
        maximum_concurrent_rpcs=4 * workers,  # more, before any key is checked upstream: RESOURCE_EXHAUSTED
    )
    proxy = Proxy(upstream, models, max_message, max_elements)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {n: proxy.handler(n) for n in RPCS}),)
    )
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen} for OIP gRPC")
    server.start()
    return server


def main(argv=None):
    """Run the proxy (`python -m deploy.oip_grpc`, see the module docstring) until TorchServe is gone."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="host:port stock clients call")
    p.add_argument("--upstream", required=True, help="host:port of TorchServe's gRPC inference")
    p.add_argument("--models", required=True, help="JSON file: {model: v2 metadata} (frontdoor.oip_models)")
    p.add_argument("--max-message", type=int, required=True, help="bytes: TorchServe's max_request_size")
    p.add_argument(
        "--max-elements", type=int, required=True, help="images per request: max_images_per_request"
    )
    p.add_argument("--watch-pid", type=int, default=0, help="exit when this process (TorchServe) is gone")
    p.add_argument("--held", action="store_true", help="the port is held by deploy/supervise.py --hold-port")
    args = p.parse_args(argv)
    with open(args.models) as f:
        models = json.load(f)
    server = serve(args.listen, args.upstream, models, args.max_message, args.max_elements, held=args.held)
    print(f"OIP gRPC {args.listen} -> {args.upstream} (max message {args.max_message} bytes)", flush=True)
    if args.watch_pid:  # however TorchServe ended, this proxy does not outlive it
        stopper = types.SimpleNamespace(shutdown=lambda: server.stop(2))
        threading.Thread(target=follow, args=(args.watch_pid, stopper), daemon=True).start()
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
