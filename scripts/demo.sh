#!/usr/bin/env bash
# Set up (or refresh) .venv and run the offline demo: PPO on SmolLM2-135M-Instruct toward positive
# movie reviews, scored by VADER. Extra arguments go to `tether demo` (e.g. --steps 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/tether demo "$@"
