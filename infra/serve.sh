#!/usr/bin/env bash
# Start a local Prefect server (SQLite under runs/.prefect) and serve the deployments of a config:
#   bash infra/serve.sh [CONFIG]     start (default configs/demo.yaml); prints the UI URL
#   bash infra/serve.sh stop         stop everything started by serve.sh / demo.sh (runs/.pids)
# Env: PREFECT_PORT (default 4200), PREFECT_HOME (default runs/.prefect). Flow runs use a local Ray
# instance, or the cluster RAY_ADDRESS / the config's ray.address names. Local instances and the
# Ray head of a `demo.sh --keep` use the checkout's token runs/.ray/auth_token, not ~/.ray.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$LVD_REPO"

case "${1:-}" in
  stop)
    lvd_stop_all
    lvd_log "stopped"
    exit 0 ;;
  -h|--help)
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    exit 0 ;;
esac

CONFIG=${1:-configs/demo.yaml}
[ -f "$CONFIG" ] || lvd_die "config $CONFIG does not exist"
lvd_need_venv
# Ray token authentication without state in ~/.ray: a flow run's local Ray instance (no address
# anywhere) or the demo's Ray head uses runs/.ray/auth_token; another cluster keeps its own token
# (the caller's RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token).
if [ "${RAY_AUTH_MODE:-token}" = token ] && [ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ]; then
  if [ -z "${RAY_ADDRESS:-}" ]; then
    config_address=$("$LVD_BIN/python" -c 'import sys; from pipeline.config import load_config; print(load_config(sys.argv[1]).ray.address or "")' "$CONFIG") \
      || lvd_die "invalid config $CONFIG"
    [ -n "$config_address" ] || lvd_use_ray_token
  elif [ "$RAY_ADDRESS" = "127.0.0.1:${RAY_HEAD_PORT:-6390}" ] && lvd_pid ray-head >/dev/null && [ -s "$LVD_RAY_TOKEN" ]; then
    lvd_use_ray_token
  fi
fi
lvd_start_prefect_server
lvd_start_serving "$CONFIG"
cat <<MSG
[lvd] Prefect UI:   $PREFECT_UI_URL   (deployments: $LVD_DEPLOYMENT and <stage>/${LVD_DEPLOYMENT#*/})
[lvd] run it:       PREFECT_API_URL=$PREFECT_API_URL .venv/bin/prefect deployment run '$LVD_DEPLOYMENT' --watch
[lvd] or quieter:   without --watch, then: PREFECT_API_URL=$PREFECT_API_URL .venv/bin/python -m pipeline.runwatch <its UUID>   (a line per stage)
[lvd] logs:         runs/logs/   pids: runs/.pids/
[lvd] stop:         bash infra/serve.sh stop
MSG
