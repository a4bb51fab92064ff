#!/usr/bin/env bash
# Sets up (with test tools) and runs the whole check: ruff, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-dev.txt
venv="${OOMLENS_VENV:-.venv}"
# The browser test (tests/e2e) drives Debian's Chromium. Install it where we can (root with apt-get, as
# on CI); elsewhere, or if apt fails, that test is skipped with the reason and the rest still runs.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test: installing Chromium for the browser test (apt-get install chromium chromium-driver)"
  apt_log=$(mktemp)
  if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver; } >"$apt_log" 2>&1; then
    rm -f "$apt_log"
  else
    echo "test: WARNING: could not install Chromium (log: $apt_log); the browser test will be skipped" >&2
  fi
fi
"$venv/bin/ruff" check .
"$venv/bin/python" -m pytest "$@"
