#!/usr/bin/env bash
# Install the headless browser that tests/server/telemetry/test_dashboard.py drives (over the DevTools
# protocol, so no chromedriver). Idempotent: does nothing when a Chromium is already there.
# `make test` runs this; `make serve` does not need a browser.
#   scripts/install-browser.sh           # Debian/Ubuntu: apt-get install chromium fonts-liberation
#   CHROME=/path/to/chrome make test     # use a browser you already have instead
set -euo pipefail

packages=(chromium fonts-liberation)  # fonts: without any, the screenshot's text is boxes

for candidate in "${CHROME:-}" chromium chromium-browser google-chrome google-chrome-stable; do  # as the test looks
  if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1; then
    exit 0
  fi
done

how="apt-get update && apt-get install -y --no-install-recommends ${packages[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser.sh: no Chromium found and no apt-get here. Install Chromium or Chrome," >&2
  echo "  then run again, or point CHROME=/path/to/chrome at it." >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "install-browser.sh: the dashboard test needs Chromium, and installing it needs root. Run:" >&2
  echo "  sudo sh -c '$how'" >&2
  exit 1
fi

echo "[install-browser] installing ${packages[*]} (about 80 MB download)"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "[install-browser] ok: $(chromium --version 2>/dev/null)"
