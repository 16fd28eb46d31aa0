#!/usr/bin/env bash
# Install the Prometheus server and promtool that tests/deploy/test_monitoring.py runs against the
# real stack (config and rules checked, a real scrape, every dashboard and rule query evaluated).
# Idempotent: does nothing when `prometheus` and `promtool` are already on PATH.
# `make test` runs this; `make serve` and the Docker image do not need it.
#   scripts/install-prometheus.sh        # Debian/Ubuntu: apt-get install prometheus (bookworm: 2.42)
set -euo pipefail

packages=(prometheus)  # Debian's package ships both binaries

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi

how="apt-get update && apt-get install -y --no-install-recommends ${packages[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-prometheus.sh: no prometheus/promtool found and no apt-get here. Install Prometheus" >&2
  echo "  (https://prometheus.io/download/), then run again with both binaries on PATH." >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "install-prometheus.sh: the monitoring tests need prometheus and promtool, and installing them" >&2
  echo "  needs root. Run:" >&2
  echo "  sudo sh -c '$how'" >&2
  exit 1
fi

echo "[install-prometheus] installing ${packages[*]} (about 20 MB download)"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
# policy-rc.d 101: the package's post-install must not start a system-wide Prometheus service;
# the tests start their own on a free port.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null
  "${as_root[@]}" chmod 755 "$policy"
  trap '"${as_root[@]}" rm -f "$policy"' EXIT
fi
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "[install-prometheus] ok: $(prometheus --version 2>&1 | head -n 1)"
