# Shared helpers of infra/serve.sh and infra/demo.sh: background processes with pid files,
# readiness checks, the local Prefect server and the `lvd serve` process. Source, do not run.
# Everything listens on 127.0.0.1 only.

LVD_REPO=${LVD_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
LVD_BIN=$LVD_REPO/.venv/bin
LVD_PIDS=$LVD_REPO/runs/.pids
LVD_LOGS=$LVD_REPO/runs/logs
PREFECT_PORT=${PREFECT_PORT:-4200}
export PREFECT_HOME=${PREFECT_HOME:-$LVD_REPO/runs/.prefect}
export PREFECT_API_URL=${PREFECT_API_URL:-http://127.0.0.1:$PREFECT_PORT/api}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
export PREFECT_LOGGING_EXTRA_LOGGERS=${PREFECT_LOGGING_EXTRA_LOGGERS:-lvd}
PREFECT_UI_URL=${PREFECT_API_URL%/api}
LVD_RAY_TOKEN=$LVD_REPO/runs/.ray/auth_token   # the token of the Ray head demo.sh starts (never ~/.ray)
LVD_STARTED=()   # names of the processes this shell started (see lvd_stop_started)

lvd_log() { echo "[lvd] $*"; }

lvd_die() { echo "[lvd] error: $*" >&2; exit 1; }

# Run infra/setup.sh when the venv is missing (setup is idempotent; demo.sh always runs it).
lvd_need_venv() {
  [ -x "$LVD_BIN/python" ] || bash "$LVD_REPO/infra/setup.sh"
}

# lvd_pid NAME: the pid recorded for NAME if that process is alive (else nothing, status 1).
lvd_pid() {
  local f="$LVD_PIDS/$1.pid" pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then echo "$pid"; else rm -f "$f"; return 1; fi
}

# lvd_start NAME CMD...: run CMD in its own session (so its children stop with it), log to
# runs/logs/NAME.log, record the pid in runs/.pids/NAME.pid.
lvd_start() {
  local name=$1; shift
  mkdir -p "$LVD_PIDS" "$LVD_LOGS"
  setsid "$@" >"$LVD_LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$LVD_PIDS/$name.pid"
  disown $! 2>/dev/null || true   # no "Killed" notice from bash when lvd_stop has to SIGKILL it
  LVD_STARTED+=("$name")
}

# lvd_stop NAME: SIGTERM NAME's process group, SIGKILL it after 20 s, forget the pid.
lvd_stop() {
  local name=$1 pid i
  pid=$(lvd_pid "$name") || return 0
  lvd_log "stopping $name (pid $pid)"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 80); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$LVD_PIDS/$name.pid"
}

# Stop everything recorded in runs/.pids: the serving processes first (they pause their
# deployments through the server), then the Prefect server, then the rest.
lvd_stop_all() {
  local f name
  [ -d "$LVD_PIDS" ] || return 0
  for f in "$LVD_PIDS"/lvd-serve*.pid; do [ -e "$f" ] && lvd_stop "$(basename "$f" .pid)"; done
  lvd_stop prefect-server
  for f in "$LVD_PIDS"/*.pid; do [ -e "$f" ] && lvd_stop "$(basename "$f" .pid)"; done
  return 0
}

# Stop only what this shell started, newest first.
lvd_stop_started() {
  local i
  for (( i=${#LVD_STARTED[@]}-1; i>=0; i-- )); do lvd_stop "${LVD_STARTED[$i]}"; done
  LVD_STARTED=()
}

# lvd_http_ok URL: true when URL answers 2xx.
lvd_http_ok() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }

# lvd_wait_http URL SECONDS WHAT [NAME]: wait for URL; fail early if process NAME exits.
lvd_wait_http() {
  local url=$1 secs=$2 what=$3 name=${4:-} i
  for i in $(seq 1 $((secs * 4))); do
    lvd_http_ok "$url" && return 0
    if [ -n "$name" ] && ! lvd_pid "$name" >/dev/null; then
      tail -n 30 "$LVD_LOGS/$name.log" >&2 2>/dev/null || true
      lvd_die "$what exited before it was ready (log: runs/logs/$name.log)"
    fi
    sleep 0.25
  done
  [ -n "$name" ] && tail -n 30 "$LVD_LOGS/$name.log" >&2 2>/dev/null
  lvd_die "$what not ready after ${secs}s ($url)"
}

# lvd_use_ray_token: Ray token authentication with this checkout's own token, for this shell and
# every process it starts (Ray head, dashboard, serving process, flow runs): runs/.ray/auth_token,
# created on first use (mode 600) and reused after. Ray reads it through RAY_AUTH_TOKEN_PATH
# (https://docs.ray.io/en/latest/ray-security/token-auth.html); a RAY_AUTH_TOKEN inherited from
# the caller would take precedence over it, so it is dropped.
lvd_use_ray_token() {
  if [ ! -s "$LVD_RAY_TOKEN" ]; then
    ( umask 077 && mkdir -p "$(dirname "$LVD_RAY_TOKEN")" \
      && "$LVD_BIN/python" -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' > "$LVD_RAY_TOKEN.tmp" \
      && mv "$LVD_RAY_TOKEN.tmp" "$LVD_RAY_TOKEN" ) || lvd_die "could not write the Ray token $LVD_RAY_TOKEN"
  fi
  unset RAY_AUTH_TOKEN
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$LVD_RAY_TOKEN
}

# Start the local Prefect server (SQLite under $PREFECT_HOME) unless one already answers.
lvd_start_prefect_server() {
  mkdir -p "$PREFECT_HOME"
  if lvd_http_ok "$PREFECT_API_URL/health"; then
    lvd_log "Prefect server already running at $PREFECT_UI_URL"
    return 0
  fi
  lvd_log "starting Prefect server on $PREFECT_UI_URL (PREFECT_HOME=$PREFECT_HOME)"
  lvd_start prefect-server "$LVD_BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  lvd_wait_http "$PREFECT_API_URL/health" 120 "the Prefect server" prefect-server
}

# lvd_config_name CONFIG: the run's name (the deployment name suffix).
lvd_config_name() {
  "$LVD_BIN/python" -c 'import sys; from pipeline.config import load_config; print(load_config(sys.argv[1]).name)' "$1"
}

# lvd_start_serving CONFIG: `lvd serve --config CONFIG` in the background, until the
# deployment curate-and-train/<name> exists. Sets LVD_DEPLOYMENT.
lvd_start_serving() {
  local config=$1 name proc
  name=$(lvd_config_name "$config") || lvd_die "invalid config $config"
  proc=lvd-serve-$name
  LVD_DEPLOYMENT=curate-and-train/$name
  if lvd_pid "$proc" >/dev/null; then
    lvd_log "deployments of $name already served (pid $(lvd_pid "$proc"))"
  else
    lvd_log "serving deployments $LVD_DEPLOYMENT and <stage>/$name"
    lvd_start "$proc" "$LVD_BIN/lvd" serve --config "$config"
  fi
  lvd_wait_http "$PREFECT_API_URL/deployments/name/$LVD_DEPLOYMENT" 120 "lvd serve" "$proc"
}
