"""LitServe serving model.onnx with ONNX Runtime (LitServe's own dynamic batching, `workers_per_device` worker
processes on the CPU), answering the raw image bytes that bench/post.lua posts.

LitServe hands decode_request JSON, a form or a pydantic model, never the raw body, so a small ASGI middleware
wraps the body as {"b64": ...} in the API server process (the base64 round trip costs well under a
millisecond for a 100 kB photo). A bad image must not fail its batch neighbours (LitServe answers the whole
batch with an exception raised by any one item), so it travels through the batch as a 400 response.
Run: .venv-peers/bin/python bench/peer_apps/litserve_app.py --onnx ... (bench/peer_frameworks.py does).
"""

import base64
import json

import common
import litserve as ls
from fastapi.responses import JSONResponse


class RawBodyAsJson:
    """ASGI middleware: a POST body that is not JSON becomes {"b64": base64 of the body}."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        """Read the whole body and hand it on as JSON (content-type rewritten) for /predict POSTs."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = json.dumps({"b64": base64.b64encode(b"".join(chunks)).decode()}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app({**scope, "headers": headers}, replay, send)


class PeerAPI(ls.LitAPI):
    """Decode and prepare each image, one ONNX Runtime call per batch, top-5 per image."""

    def __init__(self, opts, **kw):
        super().__init__(**kw)
        self.opts = opts

    def setup(self, device):
        """Load the model once per worker process."""
        self.model = common.Classifier(self.opts.onnx, self.opts.meta, self.opts.threads)

    def decode_request(self, request):
        """{"b64": body} -> a prepared image, or the 400 message when the body is not an image."""
        return self.model.decode_or_refuse(base64.b64decode(request["b64"]))

    def batch(self, inputs):
        """Keep the list: predict batches the images itself and passes the errors through."""
        return inputs

    def predict(self, x):
        """One model call for the batch's images; error messages stay in their places."""
        return self.model.answer_all(x)

    def unbatch(self, output):
        """One answer per request, in order."""
        return output

    def encode_response(self, output):
        """Top-5 as JSON, or a 400 with a JSON message."""
        if isinstance(output, str):
            return JSONResponse(common.error(output), status_code=400)
        return output


def main():
    """Serve until stopped."""
    opts = common.args()
    api = PeerAPI(opts, max_batch_size=opts.batch, batch_timeout=opts.delay_ms / 1000)
    server = ls.LitServer(
        api, accelerator="cpu", workers_per_device=opts.workers, timeout=30, middlewares=[RawBodyAsJson]
    )
    server.run(host="127.0.0.1", port=opts.port, generate_client_file=False)


if __name__ == "__main__":
    main()
