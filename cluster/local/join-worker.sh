#!/usr/bin/env bash
# Join this machine to a head started with start-head.sh. Usage:
#   bash cluster/local/join-worker.sh <head-ip>:6379 [ray start options, e.g. --num-gpus 4]
# With token authentication on, copy the head's ~/.ray/auth_token here first (or export
# RAY_AUTH_TOKEN with its content). Every node needs the same Python environment
# (`make install`, or the same image) and must reach the head's ports.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 <head-ip>:<port> [ray start options]" >&2
  exit 2
fi
HEAD="$1"; shift
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
ray start --address "$HEAD" --disable-usage-stats "$@"
