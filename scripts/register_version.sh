#!/usr/bin/env bash
# Register an archive from model_store/ as a new version of my_model; with --promote, gate it on the
# golden set and make it default only if it is good enough. Also: list, rollback, unregister.
#   scripts/register_version.sh model_store/my_model_v2.0.mar --promote --golden runs/v2/golden
#   scripts/register_version.sh model_store/my_model_v2.0.mar --dry-run --golden runs/v2/golden
#   scripts/register_version.sh list | rollback | unregister VERSION
set -euo pipefail
source "$(dirname "$0")/paths.sh"
[ $# -ge 1 ] || { echo "usage: scripts/register_version.sh ARCHIVE [--promote|--dry-run] [--golden DIR] | list | rollback | unregister VERSION" >&2; exit 2; }
case "$1" in
  list|rollback|unregister) cd "$(dirname "$0")/.."; exec .venv/bin/python -m deploy.register_version "$@" ;;
esac
absolute_options "--golden --report" "$(abspath "$1")" "${@:2}"
cd "$(dirname "$0")/.."
exec .venv/bin/python -m deploy.register_version register "${ARGS[@]}"
