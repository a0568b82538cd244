#!/usr/bin/env bash
# Stop the Ray processes of this machine (head or worker). Note: `ray stop` stops every Ray
# on the machine, including one a notebook or test started.
set -euo pipefail
ray stop "$@"
