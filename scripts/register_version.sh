#!/usr/bin/env bash
# Register an archive from model_store/ as a new version of my_model; with --promote, gate it on the
# golden set and make it default only if it is good enough. Also: list, rollback, unregister.
#   scripts/register_version.sh model_store/my_model_v2.0.mar --promote --golden runs/v2/golden
#   scripts/register_version.sh model_store/my_model_v2.0.mar --dry-run --golden runs/v2/golden
#   scripts/register_version.sh list | rollback | unregister VERSION
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/register_version.sh ARCHIVE [--promote|--dry-run] [--golden DIR] | list | rollback | unregister VERSION" >&2; exit 2; }
case "$1" in
  list|rollback|unregister) exec .venv/bin/python -m scripts.deploy "$@" ;;
  *) exec .venv/bin/python -m scripts.deploy register "$@" ;;
esac
