#!/usr/bin/env bash
# Register an archive from model_store/ as a new version of its model (the name in its manifest); with
# --promote, gate it on the model's golden set (the first --golden DIR given for the model) and make it default
# only if it answers the same classes, is good enough and agrees with the default. Also: list, rollback,
# unregister, for my_model or --model NAME.
#   scripts/register_version.sh model_store/my_model_v2.0.mar --promote --golden runs/v2/golden
#   scripts/register_version.sh model_store/my_model_v3.0.mar --promote   # the model's golden set
#   scripts/register_version.sh model_store/my_model_v3.0.mar --canary 5,25,50,100 --prometheus URL  # live, by steps
#   scripts/register_version.sh model_store/my_model_v3.0.mar --shadow 10 --step-requests 200  # mirrored, not served
#   scripts/register_version.sh model_store/my_model_v2.0.mar --dry-run --golden runs/v2/golden
#   scripts/register_version.sh model_store/textures.mar        # another model's first version: default by itself
#   scripts/register_version.sh list | rollback | unregister VERSION  [--model NAME]
set -euo pipefail
source "$(dirname "$0")/paths.sh"
USAGE="usage: scripts/register_version.sh ARCHIVE [--promote|--dry-run] [--golden DIR [--golden-from-candidate|--replace-golden]] [--allow-new-classes] [--allow-disagreement] [--canary 5,25,50,100 [--step-seconds S] [--step-requests N] --prometheus URL [--keep-candidate]] [--shadow PERCENT [--step-seconds S | --step-requests N]] [--model NAME] | list | rollback | unregister VERSION  [--model NAME]"
[ $# -ge 1 ] || { echo "$USAGE" >&2; exit 2; }
case "$1" in
  list|rollback|unregister) cd "$(dirname "$0")/.."; exec .venv/bin/python -m deploy.register_version "$@" ;;
  # ARCHIVE [options] is the module's `register` command; `ARCHIVE --help` lists its options.
  -h|--help) echo "$USAGE"; echo; cd "$(dirname "$0")/.."; exec .venv/bin/python -m deploy.register_version --help ;;
esac
absolute_options "--golden --report" "$(abspath "$1")" "${@:2}"
cd "$(dirname "$0")/.."
exec .venv/bin/python -m deploy.register_version register "${ARGS[@]}"
