#!/usr/bin/env bash
# The end-to-end demo, all on 127.0.0.1: build and serve the demo web corpus, start a local
# Prefect server and the deployments of configs/demo.yaml, run `curate-and-train/demo` (a line
# per stage as it ends) and print the stage table. Run it twice: the second run is served from
# the cache (0 requests). Also started: a local Ray head with the Ray dashboard (the flow's stages
# join it; its token: runs/.ray/auth_token) and `lvd dashboard` (the run explorer; each stage's
# Prefect artifact links to its page). Logs: runs/logs/.
#   bash infra/demo.sh          stop everything it started when done (or on Ctrl-C)
#   bash infra/demo.sh --keep   leave the servers running (stop with: bash infra/serve.sh stop)
# Env: PREFECT_PORT (default 4200), LVD_CORPUS_PORT (default 8765), LVD_DASHBOARD_PORT (8777),
#      RAY_DASHBOARD_PORT (8265), RAY_HEAD_PORT (6390); RAY_ADDRESS set: use that cluster instead.
set -euo pipefail
cd "$(dirname "$0")/.."

KEEP=0
for arg in "$@"; do
  case "$arg" in
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

bash infra/setup.sh
source infra/lib.sh

CONFIG=configs/demo.yaml
CORPUS_DIR=runs/demo-corpus
CORPUS_PORT=${LVD_CORPUS_PORT:-8765}
CORPUS_URL=http://127.0.0.1:$CORPUS_PORT
ACCESS_LOG=$CORPUS_DIR/access.log
DASHBOARD_PORT=${LVD_DASHBOARD_PORT:-8777}
export LVD_DASHBOARD_URL=${LVD_DASHBOARD_URL:-http://127.0.0.1:$DASHBOARD_PORT}   # the artifacts link here
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
RAY_HEAD_PORT=${RAY_HEAD_PORT:-6390}
RAY_DASHBOARD_URL=http://127.0.0.1:$RAY_DASHBOARD_PORT
RAY_SIGN_IN=""   # where the Ray dashboard's token is, when the demo starts the head

finish() {
  local rc=$?
  trap - EXIT INT TERM
  # An interrupted run must not stay scheduled: the next `lvd serve` would pick it up.
  if [ "$rc" != 0 ] && [ -n "${RUN_OUT:-}" ] && [ -f "$RUN_OUT" ]; then
    local run_id
    run_id=$(grep -oE 'UUID: [0-9a-f-]{36}' "$RUN_OUT" | head -n1 | cut -d' ' -f2 || true)
    [ -n "$run_id" ] && "$LVD_BIN/prefect" flow-run cancel "$run_id" >/dev/null 2>&1 \
      && lvd_log "cancelled flow run $run_id" || true
  fi
  if [ "$KEEP" = 1 ]; then
    lvd_log "servers left running: Prefect UI $PREFECT_UI_URL, lvd dashboard $LVD_DASHBOARD_URL, demo corpus $CORPUS_URL"
    [ -n "$RAY_SIGN_IN" ] && lvd_pid ray-head >/dev/null \
      && lvd_log "join its Ray head from another shell with: RAY_ADDRESS=$RAY_ADDRESS RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=${LVD_RAY_TOKEN#$LVD_REPO/}"
    lvd_log "stop them with: bash infra/serve.sh stop"
  else
    lvd_stop_started
  fi
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

count_requests() { if [ -f "$ACCESS_LOG" ]; then wc -l < "$ACCESS_LOG" | tr -d ' '; else echo 0; fi; }

# 1. The demo web corpus (built, then served until stopped).
if lvd_http_ok "$CORPUS_URL/robots.txt"; then
  lvd_log "demo corpus already served at $CORPUS_URL"
else
  lvd_log "building and serving the demo corpus at $CORPUS_URL"
  lvd_start demo-corpus "$LVD_BIN/lvd" demo-corpus --out "$CORPUS_DIR" --port "$CORPUS_PORT" --serve
  lvd_wait_http "$CORPUS_URL/robots.txt" 300 "the demo corpus server" demo-corpus
fi
requests_before=$(count_requests)

# 2. A local Ray head with the Ray dashboard; the flow runs join it through RAY_ADDRESS. It uses
#    token authentication with the demo's own token, runs/.ray/auth_token (nothing from ~/.ray):
#    the head, the dashboard, the serving process and its flow runs all get RAY_AUTH_TOKEN_PATH,
#    and the Ray dashboard asks the browser for that token.
if [ -n "${RAY_ADDRESS:-}" ]; then
  lvd_log "stages run on the Ray cluster at $RAY_ADDRESS (its dashboard is wherever that cluster serves it)"
  RAY_DASHBOARD_URL="(the dashboard of the cluster at $RAY_ADDRESS)"
else
  if [ "${RAY_AUTH_MODE:-token}" = token ]; then
    [ -s "$LVD_RAY_TOKEN" ] || ! lvd_pid ray-head >/dev/null \
      || lvd_die "a Ray head of an earlier demo runs but its token ${LVD_RAY_TOKEN#$LVD_REPO/} is gone: bash infra/serve.sh stop, then rerun"
    lvd_use_ray_token
    RAY_SIGN_IN="; sign in with the token in ${LVD_RAY_TOKEN#$LVD_REPO/}"
  fi
  if lvd_pid ray-head >/dev/null; then
    lvd_log "the Ray head of an earlier demo is running (dashboard $RAY_DASHBOARD_URL)"
  else
    lvd_http_ok "$RAY_DASHBOARD_URL/" && lvd_die "port $RAY_DASHBOARD_PORT is taken by another Ray dashboard (set RAY_DASHBOARD_PORT, or RAY_ADDRESS to use that cluster)"
    ray_cpus=$("$LVD_BIN/python" -c 'import os, sys; from pipeline.config import load_config; print(load_config(sys.argv[1]).ray.num_cpus or os.cpu_count())' "$CONFIG")
    lvd_log "starting a local Ray head (port $RAY_HEAD_PORT, $ray_cpus CPUs) with its dashboard on $RAY_DASHBOARD_URL"
    lvd_start ray-head "$LVD_BIN/ray" start --head --block --port "$RAY_HEAD_PORT" --num-cpus "$ray_cpus" \
      --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" --disable-usage-stats
    lvd_wait_http "$RAY_DASHBOARD_URL/" 180 "the Ray dashboard" ray-head
  fi
  export RAY_ADDRESS=127.0.0.1:$RAY_HEAD_PORT
fi

# 3. The run explorer (it indexes each stage's outputs as they appear).
if lvd_http_ok "$LVD_DASHBOARD_URL/healthz"; then
  lvd_log "lvd dashboard already answers at $LVD_DASHBOARD_URL"
else
  lvd_log "starting lvd dashboard on $LVD_DASHBOARD_URL"
  lvd_start lvd-dashboard "$LVD_BIN/lvd" dashboard --config "$CONFIG" --port "$DASHBOARD_PORT"
  lvd_wait_http "$LVD_DASHBOARD_URL/healthz" 120 "lvd dashboard" lvd-dashboard
fi

# 4. Prefect server + the serving process of the demo config (started after RAY_ADDRESS is set:
#    its flow runs inherit it; a serving process left from an earlier --keep run keeps its own).
lvd_start_prefect_server
lvd_start_serving "$CONFIG"

# 5. Run the whole DAG through Prefect and follow it: a line per stage as it ends; the flow run's
#    full logs go to runs/logs/demo-flow-run.txt (and stay in the Prefect UI).
RUN_OUT=$LVD_LOGS/demo-deployment-run.txt   # `prefect deployment run`'s output: the run's UUID (see finish)
FLOW_LOG=${LVD_LOGS#$LVD_REPO/}/demo-flow-run.txt
rm -f "$FLOW_LOG"   # an earlier run's, not this one's
"$LVD_BIN/prefect" deployment run "$LVD_DEPLOYMENT" > "$RUN_OUT" 2>&1 \
  || { cat "$RUN_OUT" >&2; lvd_die "could not start a flow run of $LVD_DEPLOYMENT"; }
run_id=$(grep -oE 'UUID: [0-9a-f-]{36}' "$RUN_OUT" | head -n1 | cut -d' ' -f2)
[ -n "$run_id" ] || { cat "$RUN_OUT" >&2; lvd_die "no flow run id in the output of prefect deployment run"; }
lvd_log "running $LVD_DEPLOYMENT: flow run $run_id ($PREFECT_UI_URL/runs/flow-run/$run_id)"
set +e
"$LVD_BIN/python" -m pipeline.runwatch "$run_id" --config "$CONFIG" --log "$FLOW_LOG"
rc=$?
set -e

# 6. What is on disk now, as the CLI sees it (the same cache the flow used).
echo
"$LVD_BIN/lvd" status --config "$CONFIG" || true
# 7. What the curation got right, against the corpus's ground truth (photo families, see README).
echo
echo "[lvd] curation vs the demo corpus's ground truth (python -m pipeline.demoeval):"
"$LVD_BIN/python" -m pipeline.demoeval --config "$CONFIG" 2>/dev/null | sed 's/^/        /' || true
requests=$(( $(count_requests) - requests_before ))
if [ "$requests" = 0 ]; then why="nothing was fetched: ingest came from the cache"; else why="run the demo again: a rerun sends none"; fi

cat <<MSG

[lvd] demo corpus server received $requests HTTP request(s) during this run ($why)
[lvd] outputs:      runs/demo   (stage shards under runs/demo/stages/<stage>/<fingerprint>/)
[lvd] Prefect UI:   $PREFECT_UI_URL   (flow runs, per-stage count tables under Artifacts, each linking to the dashboard)
[lvd] dashboard:    $LVD_DASHBOARD_URL   (funnel, clusters, map, queries, removed images, provenance)
[lvd] Ray:          $RAY_DASHBOARD_URL   (jobs, actors, Ray Data$RAY_SIGN_IN)
[lvd] logs:         runs/logs/   (this flow run: $FLOW_LOG; servers: <name>.log; setup: setup.log)
MSG
[ "$rc" = 0 ] || lvd_log "the flow run did not complete (exit $rc); its logs: $FLOW_LOG and the Prefect UI"
exit "$rc"
