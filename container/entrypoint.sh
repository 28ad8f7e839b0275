#!/usr/bin/env bash
# The image's entry point (container/Dockerfile).
#   no arguments:        scripts/serve.sh start --expose-inference (tokens on, the guard on management), then
#                        stay in the foreground while TorchServe runs
#   torchserve ARGS...:  TorchServe exactly as KServe's TorchServe runtime starts it (docs/kserve.md), in the
#                        foreground (the runtime's `torchserve --start` would return and end the container)
set -euo pipefail
cd /srv/bundle

if [ "${1:-}" = torchserve ]; then
  shift
  mkdir -p server/kserve && cd server/kserve  # TorchServe writes logs/ to its working directory
  exec torchserve "$@" --foreground
fi
[ $# -eq 0 ] || { echo "usage: (no arguments) | torchserve ARGS..." >&2; exit 2; }

if [ ! -f model_store/my_model.mar ]; then
  echo "error: no model_store/my_model.mar in the image: mount a model store holding it at /srv/bundle/model_store" \
       "(-v \"\$PWD/model_store:/srv/bundle/model_store:ro\") or build with --build-arg STORE=model_store" >&2
  exit 2
fi
scripts/serve.sh start --expose-inference
trap 'scripts/serve.sh stop; exit 0' TERM INT
pid=$(cat server/tmp/.model_server.pid)
while kill -0 "$pid" 2>/dev/null; do sleep 5 & wait $!; done
echo "error: TorchServe (pid $pid) exited; its logs are in /srv/bundle/server/logs" >&2
exit 1
