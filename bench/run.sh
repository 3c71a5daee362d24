#!/usr/bin/env bash
# Set up (or refresh) TRL's environment, then compare: bash bench/run.sh [--workloads a b] [--steps N ...]
# Runs from tether's .venv (create it with scripts/test.sh or scripts/demo.sh first).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/bench/setup_trl.sh"
exec "$root/.venv/bin/python" "$root/bench/compare.py" "$@"
