"""BentoML serving model.onnx with ONNX Runtime: `workers` service workers, BentoML's adaptive batching
(max_batch_size = ours), answering the raw image bytes bench/post.lua posts.

BentoML parses a request body as JSON or a multipart form; an input spec of our own reads the raw body
instead, and an output spec of our own answers each request's share of the batch (top-5, or a 400). BentoML
has no fixed batch delay: its dispatcher sizes the wait from the latencies it observes, within
max_latency_ms, which is our response timeout (a request past it is refused, not delayed).
Run: .venv-peers/bin/python bench/peer_apps/bentoml_app.py --onnx ... (bench/peer_frameworks.py does): it
re-runs itself as `bentoml serve`, the options in PEER_OPTS.
"""

import json
import os
import sys

import bentoml
import common
from _bentoml_sdk.io_models import IODescriptor
from starlette.responses import JSONResponse

RESPONSE_TIMEOUT_S = 30  # handlers/model-config.yaml's responseTimeout


class RawBody(IODescriptor):
    """The request's whole body as the one item it adds to a batch."""

    bodies: list[bytes]

    @classmethod
    async def from_http_request(cls, request, serde):
        """Whatever the content type: the raw bytes."""
        return cls(bodies=[await request.body()])


class Answer(IODescriptor):
    """One request's answer: top-5 JSON, or 400 with a JSON message."""

    @classmethod
    async def to_http_response(cls, obj, serde):
        """`obj` is this request's slice of the batch's answers (one item)."""
        (answer,) = obj
        if isinstance(answer, str):
            return JSONResponse(common.error(answer), status_code=400)
        return JSONResponse(answer)


def service(opts: dict):
    """The service class, with its workers and batching set from `opts` (the decorators take them)."""

    @bentoml.service(workers=opts["workers"], traffic={"timeout": RESPONSE_TIMEOUT_S})
    class Peer:
        """Decode each body, one ONNX Runtime call per batch, top-5 per image."""

        def __init__(self):
            self.model = common.Classifier(opts["onnx"], opts["meta"], opts["threads"])

        @bentoml.api(
            route="/predict",
            input_spec=RawBody,
            output_spec=Answer,
            batchable=True,
            max_batch_size=opts["batch"],
            max_latency_ms=RESPONSE_TIMEOUT_S * 1000,
        )
        def predict(self, bodies: list[bytes]) -> list:
            """The batch's bodies -> one answer each: top-5, or the 400 message."""
            return self.model.answer_all([self.model.decode_or_refuse(b) for b in bodies])

    return Peer


if "PEER_OPTS" in os.environ:  # imported by `bentoml serve bentoml_app:Peer`
    Peer = service(json.loads(os.environ["PEER_OPTS"]))


def main():
    """Re-run as `bentoml serve` on 127.0.0.1, the options travelling in PEER_OPTS."""
    opts = common.args()
    os.environ["PEER_OPTS"] = json.dumps(
        {**vars(opts), "onnx": os.path.abspath(opts.onnx), "meta": os.path.abspath(opts.meta)}
    )
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = ["-m", "bentoml", "serve", "bentoml_app:Peer", "--working-dir", here]
    os.execv(sys.executable, [sys.executable, *cmd, "--host", "127.0.0.1", "--port", str(opts.port)])


if __name__ == "__main__":
    main()
