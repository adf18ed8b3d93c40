#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (unit + integration) with pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
# Two pytest-xdist workers by default (most of the suite waits on servers, Ray and subprocesses, so
# two overlap well on 2 cores); tests sharing an expensive fixture stay in one worker (tests/conftest.py).
# LVD_TEST_WORKERS=0 runs everything in this one process.
workers=${LVD_TEST_WORKERS:-2}
par=()
if [ "$workers" != 0 ]; then
  par=(-n "$workers" --dist loadscope --no-loadscope-reorder)
fi
exec .venv/bin/python -m pytest -q -rs --durations=15 "${par[@]}" "$@"
