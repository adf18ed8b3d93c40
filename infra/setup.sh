#!/usr/bin/env bash
# Create .venv and install the project with the pinned versions in constraints.txt.
# Idempotent: when pyproject.toml and constraints.txt have not changed since the last
# successful install, it only checks and exits (a second or so).
# Quiet: apt's and pip's output go to runs/logs/setup.log (LVD_SETUP_LOG); a failing step prints
# the end of that log and its path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP=$VENV/.lvd-setup-stamp
LOG=${LVD_SETUP_LOG:-runs/logs/setup.log}
log_started=0

# quietly WHAT CMD...: run CMD with its output appended to $LOG (started afresh by the first step
# of this run); on failure show the end of the log and where it is, then exit.
quietly() {
  local what=$1; shift
  if [ "$log_started" = 0 ]; then
    mkdir -p "$(dirname "$LOG")"
    echo "# infra/setup.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$LOG"
    log_started=1
  fi
  echo "### $what: $*" >> "$LOG"
  if ! "$@" >> "$LOG" 2>&1; then
    tail -n 25 "$LOG" | sed 's/^/  | /' >&2
    echo "setup: $what failed; full log: $LOG" >&2
    exit 1
  fi
}

# Headless Chromium + chromedriver (Debian packages) for the dashboard's browser test; skipped when present.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium and chromium-driver (apt; log: $LOG)"
    quietly "apt-get update" apt-get update -qq
    quietly "apt-get install" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
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
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"' 2>/dev/null \
  || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
echo "setup: installing the project into $VENV (pip's output: $LOG)"
[ -x "$VENV/bin/python" ] || quietly "creating $VENV" "$PY" -m venv "$VENV"
quietly "upgrading pip" "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
# torch/torchvision are pinned to the builds pip finds on this machine's disk (constraints.txt).
quietly "pip install" "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[test]'
echo "$want" > "$STAMP"
echo "setup: installed into $VENV in ${SECONDS}s"
