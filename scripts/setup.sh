#!/usr/bin/env bash
# Create .venv with the pinned dependencies (requirements.txt) and check for Java 17+.
# Idempotent: when requirements.txt has not changed since the last install, it takes seconds.
#   scripts/setup.sh --mobile   also installs requirements-mobile.txt (ExecuTorch, for the .pte export)
#   scripts/setup.sh --test-clients   also makes .venv-kserve (KServe's client, for the tests: scripts/test.sh)
#   scripts/setup.sh --bench-peers   also makes .venv-peers (LitServe, BentoML, Ray Serve: the benchmark's peers)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP=$VENV/.requirements.sha256
MOBILE_STAMP=$VENV/.requirements-mobile.sha256
MOBILE=0
TEST_CLIENTS=0
BENCH_PEERS=0
for arg in "$@"; do
  case $arg in
    --mobile) MOBILE=1 ;;
    --test-clients) TEST_CLIENTS=1 ;;
    --bench-peers) BENCH_PEERS=1 ;;
    *) echo "setup: unknown option $arg (--mobile: ExecuTorch; --test-clients: .venv-kserve for the tests;" \
         "--bench-peers: .venv-peers for the benchmark)" >&2; exit 2 ;;
  esac
done

find_python() {  # a Python 3.11 that can make a venv; as root, one the service user can run too
  local py path first=""
  for py in python3.11 /usr/bin/python3.11 python3 python; do
    path=$(command -v "$py") || continue
    "$path" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || continue
    [ -n "$first" ] || first=$path
    # TorchServe started by root runs as `torchserve`, which must be able to run the venv's Python: a pyenv
    # Python under /root (mode 0700) it cannot, so prefer another one (deploy/privileges.py, docs/security.md).
    if [ "$(id -u)" != 0 ] || ! id -u torchserve >/dev/null 2>&1 \
        || runuser -u torchserve -- "$path" -c '' 2>/dev/null; then
      echo "$path"; return 0
    fi
  done
  [ -n "$first" ] || return 1
  echo "setup: warning: user 'torchserve' cannot run $first, so TorchServe will run as root (docs/security.md)" >&2
  echo "$first"
}

check_java() {
  local version major
  if command -v java >/dev/null; then
    version=$(java -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')
    major=${version%%.*}
    if [ "${major:-0}" -ge 17 ] 2>/dev/null; then return 0; fi
    echo "setup: found Java ${version:-unknown}; TorchServe 0.12 needs Java 17 or newer." >&2
  else
    echo "setup: Java not found; TorchServe's frontend needs Java 17 or newer." >&2
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing openjdk-17-jre-headless with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
    return 0
  fi
  cat >&2 <<'MSG'
setup: install it, then run this script again:
  Debian/Ubuntu:  sudo apt-get install -y openjdk-17-jre-headless
  Fedora/RHEL:    sudo dnf install -y java-17-openjdk-headless
  macOS:          brew install openjdk@17
MSG
  exit 1
}

check_java

ci_needs() {  # under CI (.ci/run sets CI=1) a missing tool stops here: its tests would fail anyway (tests/conftest.py)
  [ -z "${CI:-}" ] && return 0
  echo "setup: CI needs $1; run .ci/run as root (it installs them) or install them first" >&2
  exit 1
}

# The HTTPS front door (deploy/frontdoor.py) is HAProxy; the overload benchmark drives wrk. Both from the
# distribution's packages; without root, say how (the rest of the bundle works without them).
check_frontdoor_tools() {
  command -v haproxy >/dev/null && command -v wrk >/dev/null && command -v openssl >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing haproxy, wrk and openssl with apt-get (the front door and its benchmark)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy wrk openssl >/dev/null
    return 0
  fi
  echo "setup: the front door needs haproxy, wrk and openssl: sudo apt-get install -y haproxy wrk openssl" >&2
  ci_needs "haproxy, wrk and openssl"
}

check_frontdoor_tools

# tests/test_prometheus.py scrapes a test TorchServe with a real Prometheus (its own, on a free port). Without
# recommends: they pull in prometheus-node-exporter, a daemon on :9100. Where systemd runs, the package starts a
# prometheus service on :9090; stop the one it started (one already running before is not ours to stop).
check_prometheus() {
  command -v prometheus >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing prometheus with apt-get (tests/test_prometheus.py)" >&2
    local before
    before=$(pgrep -x prometheus || true)
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    if [ -z "$before" ] && pgrep -x prometheus >/dev/null; then
      echo "setup: stopping the prometheus service the package started (the tests start their own)" >&2
      systemctl disable --now prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true
    fi
    return 0
  fi
  echo "setup: tests/test_prometheus.py needs prometheus: sudo apt-get install -y prometheus" >&2
  ci_needs prometheus
}

check_prometheus

# TorchServe's gRPC management port cannot be turned off and registers any model directory: started by root, the
# server lets only root and its user connect to it through an nftables table (deploy/firewall.py).
check_nftables() {
  command -v nft >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing nftables with apt-get (only root and the server's user reach gRPC management)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null
    return 0
  fi
  echo "setup: without nftables every local user can reach TorchServe's gRPC management: sudo apt-get install -y nftables" >&2
}

check_nftables

# Started as root, TorchServe runs as this unprivileged user (SERVICE_USER in bundle/settings.py): a model's
# handler is code, and it must never run as root.
if [ "$(id -u)" = 0 ] && ! id -u torchserve >/dev/null 2>&1; then
  if command -v useradd >/dev/null; then
    echo "setup: creating the system user 'torchserve' that TorchServe runs as when started by root"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin torchserve
  else
    echo "setup: warning: no useradd here; create a user 'torchserve' or TorchServe will run as root" >&2
  fi
fi

# The archives and the training runs are the models: readable by root and the service user's group only.
mkdir -p model_store runs
chmod 0750 model_store runs
if [ "$(id -u)" = 0 ] && id -u torchserve >/dev/null 2>&1; then
  chgrp torchserve model_store runs
fi

# `torchserve --start --models my_model=my_model.mar`, typed as is with the venv active, finds this bundle's
# config: the activate script points TS_CONFIG_FILE (which TorchServe's CLI reads) at a copy of
# config.properties whose relative paths are made absolute, so the command works from any directory.
literal_config() {
  [ -f "$VENV/bin/activate" ] || return 0
  local root copy=$VENV/torchserve.config.properties
  root=$(pwd)
  sed -E -e "s#^(model_store|metrics_config)=([^/].*)\$#\1=$root/\2#" \
    -e "s#(-Dlog4j\.configurationFile=)([^/ ][^ ]*)#\1$root/\2#" config.properties > "$copy"
  grep -qs "TS_CONFIG_FILE" "$VENV/bin/activate" || cat >> "$VENV/bin/activate" <<ACT

# added by scripts/setup.sh: \`torchserve --start --models my_model=my_model.mar\` uses this bundle's config
export TS_CONFIG_FILE="$root/$copy"
ACT
}

# pip's find-links on this kind of machine prints one harmless warning per package; keep the log readable.
# pip's own exit status decides (a pipe into grep would hide it): no stamp, so the next run tries again.
pip_install() {  # pip_install REQUIREMENTS [VENV]
  local venv=${2:-$VENV}
  local log=$venv/pip-install.log
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$1" >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
    echo "setup: pip install failed (-r $1; full log: $log); fix the cause above and run scripts/setup.sh again" >&2
    exit 1
  fi
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
}

# ExecuTorch is optional (docs/mobile.md): its own stamp covers both files, since it runs on requirements.txt's torch.
install_mobile() {
  [ "$MOBILE" = 1 ] || return 0
  local want_mobile
  want_mobile=$(cat requirements.txt requirements-mobile.txt | sha256sum | cut -d' ' -f1)
  if [ -f "$MOBILE_STAMP" ] && [ "$(cat "$MOBILE_STAMP")" = "$want_mobile" ]; then
    echo "setup: ExecuTorch (requirements-mobile.txt) is up to date"
    return 0
  fi
  echo "setup: installing requirements-mobile.txt (ExecuTorch) into $VENV (about a minute)"
  pip_install requirements-mobile.txt
  echo "$want_mobile" > "$MOBILE_STAMP"
}

# A venv of its own, for what .venv must not carry; its own stamp, so an unchanged requirements file takes no time.
install_own_venv() {  # install_own_venv VENV REQUIREMENTS WHAT
  local venv=$1 reqs=$2 what=$3 want_own
  want_own=$(sha256sum "$reqs" | cut -d' ' -f1)
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" = "$want_own" ]; then
    echo "setup: $venv ($what, $reqs) is up to date"
    return 0
  fi
  echo "setup: installing $reqs into $venv ($what; about a minute)"
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  pip_install "$reqs" "$venv"
  echo "$want_own" > "$venv/.requirements.sha256"
}

# KServe's own client, for tests/test_kserve_client.py only: kserve pins psutil, pandas and python-dateutil below
# .venv's and pulls in ~40 server packages (requirements-kserve.txt).
install_kserve_client() {
  [ "$TEST_CLIENTS" = 1 ] || return 0  # tests only: a serving host never needs it
  install_own_venv .venv-kserve requirements-kserve.txt "KServe's client for the tests"
}

# The benchmark's peers (bench/peer_frameworks.py): LitServe, BentoML and Ray Serve with ONNX Runtime
# (requirements-peers.txt: 115 packages, 630 MB, no torch).
install_bench_peers() {
  [ "$BENCH_PEERS" = 1 ] || return 0  # benchmarks and their tests only: a serving host never needs it
  install_own_venv .venv-peers requirements-peers.txt "LitServe, BentoML, Ray Serve: the benchmark's peers"
}

PY=$(find_python) || { echo "setup: Python 3.11 is required (python3.11 not found)" >&2; exit 1; }
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  literal_config
  echo "setup: .venv is up to date with requirements.txt"
  install_mobile
  install_kserve_client
  install_bench_peers
  exit 0
fi

[ -x "$VENV/bin/python" ] || { echo "setup: creating $VENV with $($PY --version)"; "$PY" -m venv "$VENV"; }
echo "setup: installing requirements.txt into $VENV (first time: a few minutes; torch alone is ~5 GB)"
pip_install requirements.txt
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
mods = ["torch", "torchvision", "ts", "model_archiver", "yaml", "onnx", "onnxruntime", "sklearn", "PIL", "pytest"]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"setup: install incomplete, missing {missing}")
PY
literal_config
echo "$want" > "$STAMP"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, ts; print("torch", torch.__version__, "| torchserve", ts.__version__)'))"
install_mobile
install_kserve_client
install_bench_peers
