"""Ray Serve serving model.onnx with ONNX Runtime: `workers` replicas of one deployment (num_cpus = threads
each), Ray Serve's own dynamic batching (@serve.batch), answering the raw image bytes bench/post.lua posts.

The replicas import common.py by name: bench/peer_frameworks.py puts bench/peer_apps on PYTHONPATH, which
Ray's worker processes inherit from this driver.
Run: .venv-peers/bin/python bench/peer_apps/ray_app.py --onnx ... (bench/peer_frameworks.py does).
"""

import threading

import common
import ray
from ray import serve
from starlette.responses import JSONResponse


def deployment(opts):
    """The deployment class, its batching set from `opts` (serve.batch takes its limits at definition)."""

    @serve.deployment(
        num_replicas=opts.workers,
        ray_actor_options={"num_cpus": opts.threads},
        max_ongoing_requests=max(5, 2 * opts.batch),  # enough in flight per replica for a full batch
    )
    class Peer:
        """Decode each body, one ONNX Runtime call per batch, top-5 per image."""

        def __init__(self):
            self.model = common.Classifier(opts.onnx, opts.meta, opts.threads)

        @serve.batch(max_batch_size=opts.batch, batch_wait_timeout_s=opts.delay_ms / 1000)
        async def classify(self, bodies: list[bytes]) -> list:
            """The batch's bodies -> one answer each: top-5, or the 400 message."""
            return self.model.answer_all([self.model.decode_or_refuse(b) for b in bodies])

        async def __call__(self, request):
            """POST body -> top-5 JSON, or 400 with a JSON message."""
            answer = await self.classify(await request.body())
            if isinstance(answer, str):
                return JSONResponse(common.error(answer), status_code=400)
            return answer

    return Peer


def main():
    """Start Ray on this machine's share of cores and serve until stopped."""
    opts = common.args()
    ray.init(num_cpus=opts.workers * opts.threads, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": opts.port})
    serve.run(deployment(opts).bind(), route_prefix="/predict", blocking=False)
    print(f"ray serve ready on 127.0.0.1:{opts.port}/predict", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
