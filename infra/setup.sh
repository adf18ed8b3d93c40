#!/usr/bin/env bash
# Create .venv and install the project with the pinned versions in constraints.txt.
# Idempotent: when pyproject.toml and constraints.txt have not changed since the last
# successful install, it only checks and exits (a second or so).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP=$VENV/.lvd-setup-stamp
# Headless Chromium + chromedriver (Debian packages) for the dashboard's browser test; skipped when present.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium and chromium-driver (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
  else
    echo "setup: chromium/chromedriver missing; as root: apt-get install chromium chromium-driver (browser tests need them)"
  fi
fi
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && "$VENV/bin/python" -c "import pipeline, flows" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"' \
  || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
# torch/torchvision are pinned to the builds pip finds on this machine's disk (constraints.txt).
"$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[test]'
echo "$want" > "$STAMP"
echo "setup: installed into $VENV"
