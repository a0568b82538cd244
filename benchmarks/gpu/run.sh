#!/usr/bin/env bash
# The GPU check (issue 18): at most ~8 minutes on one H200, no network. Run from anywhere:
#   bash benchmarks/gpu/run.sh              # GPU: bf16 DPO step MFU, reference / rollout tokens/s,
#                                           # DPO and 20-step online DPO jobs, weight push, gpu tests
#   bash benchmarks/gpu/run.sh --dry-run    # CPU, tiny shapes, the same code path (CI runs it)
# Options after the first are passed on (see benchmarks/gpu/gpu_check.py --help), e.g.
# --shapes 0.5b,1.5b or --skip tests. The JSON summary is the last stdout line and
# $OUT/gpu_check.json (OUT defaults to outputs/gpu-check); library logs go to $OUT/gpu_check.log.
# PY picks the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
OUT=${OUT:-outputs/gpu-check}
mkdir -p "$OUT"
echo "gpu-check: $("$PY" --version 2>&1) at $PY; output in $OUT" >&2
"$PY" benchmarks/gpu/gpu_check.py --out "$OUT" "$@" 2> >(tee "$OUT/gpu_check.log" | grep --line-buffered '^\[gpu-check\|^gpu-check\|Error' >&2)
