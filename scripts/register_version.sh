#!/usr/bin/env bash
# Register an archive from model_store/ as a new version of my_model; with --promote, gate it on the
# golden set and make it default only if it is good enough. Also: list, rollback, unregister.
#   scripts/register_version.sh model_store/my_model_v2.0.mar --promote --golden runs/v2/golden
#   scripts/register_version.sh model_store/my_model_v2.0.mar --dry-run --golden runs/v2/golden
#   scripts/register_version.sh list | rollback | unregister VERSION
set -euo pipefail
abspath() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
[ $# -ge 1 ] || { echo "usage: scripts/register_version.sh ARCHIVE [--promote|--dry-run] [--golden DIR] | list | rollback | unregister VERSION" >&2; exit 2; }
case "$1" in
  list|rollback|unregister) cd "$(dirname "$0")/.."; exec .venv/bin/python -m scripts.deploy "$@" ;;
esac
# Paths are relative to where we were called from: make them absolute before moving to the repo root.
args=("$(abspath "$1")"); shift
while [ $# -gt 0 ]; do
  case $1 in
    --golden|--report) if [ $# -ge 2 ]; then args+=("$1" "$(abspath "$2")"); shift 2; else args+=("$1"); shift; fi ;;
    --golden=*|--report=*) args+=("${1%%=*}=$(abspath "${1#*=}")"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
cd "$(dirname "$0")/.."
exec .venv/bin/python -m scripts.deploy register "${args[@]}"
