#!/usr/bin/env bash
# Submit a rayalign job to the local head and follow its logs; exits with the job's status.
#   bash cluster/local/submit.sh jobs/dpo-tiny.yaml [--key value overrides]
# The command is taken from the config's name (dpo-*, sft-*, reward-*, online-dpo-*, sweep-*).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 <jobs/config.yaml> [overrides]" >&2
  exit 2
fi
CONFIG="$1"; shift
NAME="$(basename "$CONFIG")"
case "$NAME" in
  online-dpo-*) COMMAND=online-dpo ;;
  *) COMMAND="${NAME%%-*}" ;;
esac
cd "$(dirname "$0")/../.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
exec ray job submit --address "${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265}}" \
    --runtime-env jobs/runtime_env.yaml -- python -m rayalign "$COMMAND" --config "$CONFIG" "$@"
