#!/usr/bin/env bash
# Register an archive from model_store/ as a new version of its model (the name in its manifest); with
# --promote, gate it on the golden set and make it default only if it answers the same classes and is good
# enough. Also: list, rollback, unregister, for my_model or --model NAME.
#   scripts/register_version.sh model_store/my_model_v2.0.mar --promote --golden runs/v2/golden
#   scripts/register_version.sh model_store/my_model_v2.0.mar --dry-run --golden runs/v2/golden
#   scripts/register_version.sh model_store/textures.mar        # another model's first version: default by itself
#   scripts/register_version.sh list | rollback | unregister VERSION  [--model NAME]
set -euo pipefail
source "$(dirname "$0")/paths.sh"
USAGE="usage: scripts/register_version.sh ARCHIVE [--promote|--dry-run] [--golden DIR] [--allow-new-classes] [--model NAME] | list | rollback | unregister VERSION  [--model NAME]"
[ $# -ge 1 ] || { echo "$USAGE" >&2; exit 2; }
case "$1" in
  list|rollback|unregister) cd "$(dirname "$0")/.."; exec .venv/bin/python -m deploy.register_version "$@" ;;
  # ARCHIVE [options] is the module's `register` command; `ARCHIVE --help` lists its options.
  -h|--help) echo "$USAGE"; echo; cd "$(dirname "$0")/.."; exec .venv/bin/python -m deploy.register_version --help ;;
esac
absolute_options "--golden --report" "$(abspath "$1")" "${@:2}"
cd "$(dirname "$0")/.."
exec .venv/bin/python -m deploy.register_version register "${ARGS[@]}"
