#!/usr/bin/env bash
# Build and run the bundle's container image (container/Dockerfile, docs/container.md).
#   scripts/container.sh base                                   # Debian base via debootstrap (cached)
#   scripts/container.sh build [--base IMAGE] [--tag TAG] [--bake STORE]
#   scripts/container.sh run [--store DIR | --baked] [--port 8080] [--tag TAG] [--name NAME]
#   scripts/container.sh header | curl -H @- -T IMAGE http://127.0.0.1:8080/predictions/my_model
#   scripts/container.sh rm [--name NAME]
set -euo pipefail
source "$(dirname "$0")/paths.sh"
absolute_options "--store --bake" "$@"
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/container.sh base|build|run|header|rm [options]" >&2; exit 2; }
exec .venv/bin/python -m deploy.container "${ARGS[@]}"
