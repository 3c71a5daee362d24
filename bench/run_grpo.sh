#!/usr/bin/env bash
# Workload (c), tether's GRPO vs TRL 1.16's GRPOTrainer, in one command:
#   bash bench/run_grpo.sh [compare_grpo.py options, e.g. --steps 5 3 --threads 1 --rounds 2]
# Creates or refreshes bench/.venv-trl116 (bench/setup_trl116.sh), then runs bench/compare_grpo.py with tether's
# .venv and this checkout's src/ (PYTHONPATH), so it measures the tree it is run from.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/bench/setup_trl116.sh" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" exec "$root/.venv/bin/python" "$root/bench/compare_grpo.py" "$@"
