#!/usr/bin/env bash
# Create or refresh bench/.venv-trl: TRL's classic PPOTrainer (trl 0.11.4) on transformers 4.46,
# the generation of TRL the training FAQ was written for. torch is pinned to the same 2.13.0 as
# tether's .venv (installed first, then held by a constraints file so no dependency can swap it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-trl"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/pip"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
echo "[setup_trl] torch 2.13.0 first"
"$pip" install -q "torch==2.13.0"
echo "[setup_trl] trl 0.11.4, transformers 4.46 and their dependencies"
"$pip" install -q -c "$constraints" \
    "trl==0.11.4" "transformers==4.46.*" "tokenizers>=0.20,<0.21" "accelerate==1.0.1" \
    "datasets==3.0.2" "vaderSentiment==3.3.2" "numpy<2.3" "rich" "psutil"
"$venv/bin/python" - <<'PY'
import torch, transformers, trl
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: F401  the classic API
print(f"[setup_trl] ok: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
