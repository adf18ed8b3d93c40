#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (unit + integration) with pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
