#!/usr/bin/env bash
# The main job, end to end on the bundled digits: set up, train 1.0, archive, serve, predict,
# train 2.0 with another recipe, archive, register it through the management API behind the
# promotion gate, predict through both versions. Leaves TorchServe running.
# Safe to re-run: finished steps are reused (runs/, model_store/ are never overwritten).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
step() { printf '\n\033[1m== %s\033[0m  (%ds)\n' "$*" $(( $(date +%s) - START )); }
PY=.venv/bin/python

step "1/10 setup"
scripts/setup.sh

step "2/10 default data: scikit-learn digits as PNGs in data/digits/{train,val}/<digit>/"
$PY -m train.data

train() {  # train VERSION_DIR ARGS... ; resumes an interrupted run, reuses a finished one
  local out=$1; shift
  if [ -f "$out/metrics.json" ] && $PY -c "import json,sys; sys.exit(not json.load(open('$out/metrics.json'))['complete'])"; then
    echo "reusing finished run $out ($($PY -c "import json; m=json.load(open('$out/metrics.json')); print(f\"best val acc {m['best_val_acc']:.4f}\")"))"
  elif [ -f "$out/checkpoint_last.pt" ]; then
    $PY -m train.train --output-dir "$out" --resume auto "$@"
  else
    $PY -m train.train --output-dir "$out" "$@"
  fi
}
archive() {  # archive VERSION RUN_DIR ARCHIVE_PATH
  if [ -f "$3" ]; then
    echo "reusing $3 (sha256 $(cut -c1-12 "$3.sha256")...)"
  else
    scripts/archive.sh "$1" "$2/checkpoint_best.pt"
  fi
}

step "3/10 train version 1.0 (default recipe: AdamW, cosine, label smoothing, learnable Swish)"
train runs/v1

step "4/10 archive 1.0 -> model_store/my_model.mar"
archive 1.0 runs/v1 model_store/my_model.mar

step "5/10 start TorchServe (inference :8080, management :8081, metrics :8082)"
# Capture first: `grep -q` on a pipe would close it early and break the writer under pipefail.
status=$($PY -m deploy.serve status)
if grep -q "is running" <<<"$status"; then
  echo "TorchServe is already running: keeping it"
else
  scripts/serve.sh start
fi
$PY -m deploy.predict $(ls data/digits/val/*/*.png | awk 'NR % 36 == 1')

step "6/10 train version 2.0 (another recipe: SGD + Nesterov, focal loss, step schedule, wider)"
train runs/v2 --opt sgd --lr 0.05 --lr-scheduler step --lr-step-size 8 --loss focal --widths 48,96,192 --epochs 12 --seed 1

step "7/10 archive 2.0 -> model_store/my_model_v2.0.mar"
archive 2.0 runs/v2 model_store/my_model_v2.0.mar

step "8/10 register 2.0 through the management API; promote it only if it passes the gate"
# Registered is not enough to skip the gate: 2.0 registered but not default is either an earlier run
# that stopped mid-gate (or a registration without --promote), or a rollback after 2.0 was promoted.
# A re-run does what a fresh run would, except that it keeps a rollback (someone chose it): it gates
# 2.0 unless 2.0 is default or its promotion is in the history that rollback reads.
listed=$($PY -m deploy.register_version list || true)
if grep -Eq "^my_model 2\.0 +default" <<<"$listed"; then
  echo "2.0 is already the default"
  echo "$listed"
elif grep -Eq "^my_model 2\.0 " <<<"$listed" \
    && grep -qsF '"op": "default", "state": "done", "model": "my_model", "version": "2.0"' server/state/deployments.jsonl; then
  echo "2.0 passed the gate once and was rolled back since: keeping the current default (server/state/deployments.jsonl)"
  echo "$listed"
else
  if grep -Eq "^my_model 2\.0 " <<<"$listed"; then
    echo "2.0 is registered but was never promoted (an earlier run stopped mid-gate?): unregistering it to gate it again"
    scripts/register_version.sh unregister 2.0
  fi
  scripts/register_version.sh model_store/my_model_v2.0.mar --promote --golden runs/v2/golden --max-accuracy-drop 1.0
fi

step "9/10 predict through both versions"
imgs=$(ls data/digits/val/*/*.png | awk 'NR % 36 == 7')
$PY -m deploy.predict --version 1.0 $imgs
$PY -m deploy.predict --version 2.0 $imgs
$PY -m deploy.register_version list

step "10/10 a real pretrained model beside it: EfficientNet-Lite0 (ImageNet weights) as model imagenet 1.0"
scripts/import_pretrained.sh

img=$(ls data/digits/val/3/*.png | head -1)
cat <<MSG

Done in $(( $(date +%s) - START ))s. TorchServe is still running. Try (keys reach curl on stdin, never on a command line):
  scripts/serve.sh header | curl -H @- -T $img http://127.0.0.1:8080/predictions/my_model
  scripts/serve.sh header | curl -H @- -T $img http://127.0.0.1:8080/predictions/my_model/1.0
  scripts/serve.sh header management | curl -H @- http://127.0.0.1:8081/models/my_model/all
  curl http://127.0.0.1:8082/metrics
  scripts/predict.sh $img 2.0
  scripts/serve.sh header | curl -H @- -T data/photos/samples/chelsea.jpg http://127.0.0.1:8080/predictions/imagenet
Training reports: runs/v1/ and runs/v2/ (metrics.json, curves.png, confusion_matrix.png; .venv/bin/tensorboard --logdir runs)
Stop with: scripts/serve.sh stop
MSG
