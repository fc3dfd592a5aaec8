#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver, for the dashboard's browser test
# (tests/integration/test_dashboard.py drives /usr/bin/chromium through
# /usr/bin/chromedriver with selenium). Does nothing when both are there.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo installed)"
  exit 0
fi

sudo_cmd=()
if [ "$(id -u)" != 0 ]; then
  sudo_cmd=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver
echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo installed)"
