#!/usr/bin/env bash
# Start a local Prefect server (SQLite under runs/.prefect) and serve the deployments of a config:
#   bash infra/serve.sh [CONFIG]     start (default configs/demo.yaml); prints the UI URL
#   bash infra/serve.sh stop         stop everything started by serve.sh / demo.sh (runs/.pids)
# Env: PREFECT_PORT (default 4200), PREFECT_HOME (default runs/.prefect).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$LVD_REPO"

case "${1:-}" in
  stop)
    lvd_stop_all
    lvd_log "stopped"
    exit 0 ;;
  -h|--help)
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 0 ;;
esac

CONFIG=${1:-configs/demo.yaml}
[ -f "$CONFIG" ] || lvd_die "config $CONFIG does not exist"
lvd_need_venv
lvd_start_prefect_server
lvd_start_serving "$CONFIG"
cat <<MSG
[lvd] Prefect UI:   $PREFECT_UI_URL   (deployments: $LVD_DEPLOYMENT and <stage>/${LVD_DEPLOYMENT#*/})
[lvd] run it:       PREFECT_API_URL=$PREFECT_API_URL .venv/bin/prefect deployment run '$LVD_DEPLOYMENT' --watch
[lvd] logs:         runs/logs/   pids: runs/.pids/
[lvd] stop:         bash infra/serve.sh stop
MSG
