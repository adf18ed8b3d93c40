#!/usr/bin/env bash
# The end-to-end demo, all on 127.0.0.1: build and serve the demo web corpus, start a local
# Prefect server and the deployments of configs/demo.yaml, run `curate-and-train/demo` and
# print the stage table. Run it twice: the second run is served from the cache (0 requests).
#   bash infra/demo.sh          stop everything it started when done (or on Ctrl-C)
#   bash infra/demo.sh --keep   leave the servers running (stop with: bash infra/serve.sh stop)
# Env: PREFECT_PORT (default 4200), LVD_CORPUS_PORT (default 8765).
set -euo pipefail
cd "$(dirname "$0")/.."

KEEP=0
for arg in "$@"; do
  case "$arg" in
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
    lvd_log "servers left running: Prefect UI $PREFECT_UI_URL, demo corpus $CORPUS_URL"
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

# 2. Prefect server + the serving process of the demo config.
lvd_start_prefect_server
lvd_start_serving "$CONFIG"

# 3. Run the whole DAG through Prefect and watch it.
lvd_log "running $LVD_DEPLOYMENT (follow it in the UI: $PREFECT_UI_URL)"
RUN_OUT=$LVD_LOGS/demo-flow-run.txt
set +e
"$LVD_BIN/prefect" deployment run "$LVD_DEPLOYMENT" --watch 2>&1 | tee "$RUN_OUT"
rc=${PIPESTATUS[0]}
set -e

# 4. What is on disk now, as the CLI sees it (the same cache the flow used).
echo
"$LVD_BIN/lvd" status --config "$CONFIG" || true
requests=$(( $(count_requests) - requests_before ))
if [ "$requests" = 0 ]; then why="nothing was fetched: ingest came from the cache"; else why="run the demo again: a rerun sends none"; fi

cat <<MSG

[lvd] demo corpus server received $requests HTTP request(s) during this run ($why)
[lvd] outputs:      runs/demo   (stage shards under runs/demo/stages/<stage>/<fingerprint>/)
[lvd] Prefect UI:   $PREFECT_UI_URL   (flow runs, per-stage count tables under Artifacts)
[lvd] Ray:          stages run on a local Ray instance inside the flow run (RAY_ADDRESS selects a cluster);
                    (the Ray dashboard is not served yet: it needs Ray's default extra)
MSG
[ "$rc" = 0 ] || lvd_log "the flow run did not complete (exit $rc); its logs are in the Prefect UI and runs/logs/"
exit "$rc"
