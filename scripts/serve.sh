#!/usr/bin/env bash
# Start, stop or inspect the TorchServe of this bundle (config.properties, ports 8080/8081/8082).
#   scripts/serve.sh start [--fresh] [--front-door | --expose-inference] [--no-tokens]   (--front-door: HTTPS on :8443)
#   scripts/serve.sh stop | status | restart
#   scripts/serve.sh header [inference|management] | curl -H @- ...   (the key on stdin, never in `ps`)
# start waits until every registered version has a ready worker; it restores the versions
# and the default registered before the last stop (--fresh: only model_store/my_model.mar).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/serve.sh start|stop|status|restart [options] | header [inference|management]" >&2; exit 2; }
exec .venv/bin/python -m deploy.serve "$@"
