#!/usr/bin/env bash
# Install Debian's `prometheus` package (the Prometheus server and `promtool`), idempotently, without
# leaving a daemon running: tests start their own Prometheus on 127.0.0.1 (tests/test_observability.py).
#
# - Nothing to do when both `prometheus` and `promtool` are already on PATH.
# - Needs root (or passwordless sudo) and apt-get; `apt-get update` runs once, only when installing.
# - Debian's maintainer scripts may try to start prometheus.service. Starting is vetoed with a
#   policy-rc.d (exit 101) for the duration of the install, unless one is already in place; any
#   prometheus process that appears anyway is stopped through its service and then by its pid.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have prometheus && have promtool; then
  echo "prometheus already installed: $(prometheus --version 2>&1 | head -n1)"
  exit 0
fi

SUDO=()
if [ "$(id -u)" != 0 ]; then
  if have sudo && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "install-prometheus: need root (or passwordless sudo) to apt-get install prometheus" >&2
    exit 1
  fi
fi
if ! have apt-get; then
  echo "install-prometheus: apt-get not found; install Prometheus (prometheus, promtool) another way" >&2
  exit 1
fi

POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
cleanup() {
  if [ "$CREATED_POLICY" = 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi
}
trap cleanup EXIT
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\n# install-prometheus.sh: start no services while installing\nexit 101\n' \
    | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 755 "$POLICY"
  CREATED_POLICY=1
fi

before="$(pgrep -x prometheus || true)"

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
# No recommends: prometheus-node-exporter and friends are daemons we do not want here.
"${SUDO[@]}" apt-get install -y -q --no-install-recommends prometheus

# Stop whatever the package started despite the policy (systemd hosts ignore policy-rc.d).
started=""
for pid in $(pgrep -x prometheus || true); do
  case " $(echo $before) " in *" $pid "*) ;; *) started="$started $pid" ;; esac
done
if [ -n "$started" ]; then
  echo "install-prometheus: the package started prometheus (pid$started); stopping it"
  if have systemctl && [ -d /run/systemd/system ]; then
    "${SUDO[@]}" systemctl disable --now prometheus.service || true
  elif have invoke-rc.d; then
    "${SUDO[@]}" invoke-rc.d --force prometheus stop || true
  fi
  for pid in $started; do
    if kill -0 "$pid" 2>/dev/null; then "${SUDO[@]}" kill "$pid" || true; fi
  done
fi

have prometheus && have promtool || { echo "install-prometheus: prometheus/promtool missing after install" >&2; exit 1; }
echo "installed $(prometheus --version 2>&1 | head -n1); $(promtool --version 2>&1 | head -n1)"
