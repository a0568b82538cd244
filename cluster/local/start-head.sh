#!/usr/bin/env bash
# Start a Ray head on this machine; rayalign jobs then attach to it instead of starting
# their own Ray. Extra arguments go to `ray start` (e.g. --num-cpus 8 --num-gpus 1 --block).
#   bash cluster/local/start-head.sh
#   bash cluster/local/submit.sh jobs/dpo-tiny.yaml --max_steps 20
#   bash cluster/local/stop.sh
# Ray 2.60 enables token authentication on new clusters: `ray start` writes a token to
# ~/.ray/auth_token (or uses RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH), and every client
# (ray job submit, a driver started with RAY_ADDRESS) must run with RAY_AUTH_MODE=token.
# RAY_AUTH_MODE=disabled before this script turns it off (a machine nobody else can reach).
set -euo pipefail
PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
ray start --head --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --disable-usage-stats "$@"
cat <<MSG
Ray head is up. To use it from this shell:
  export RAY_AUTH_MODE=$RAY_AUTH_MODE
  export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT   # for ray job submit / ray job logs
  export RAY_ADDRESS=127.0.0.1:$PORT                               # for a driver run directly here
Workers join with: bash cluster/local/join-worker.sh <this-host-ip>:$PORT
MSG
