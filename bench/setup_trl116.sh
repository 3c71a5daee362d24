#!/usr/bin/env bash
# Create or refresh bench/.venv-trl116: TRL 1.16's GRPOTrainer (trl 1.16.0), the maintained trainer, for
# workload (c) and the response-length curves. transformers is pinned to the version tether's .venv runs
# (5.24.0), so both sides run the same GPT-2 / Llama modelling code; torch is pinned to the same 2.13.0
# (installed first, then held by a constraints file so no dependency can swap it). No vLLM: TRL generates
# with transformers' `generate` (use_vllm=False).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-trl116"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/pip"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
echo "[setup_trl116] torch 2.13.0 first"
"$pip" install -q "torch==2.13.0"
echo "[setup_trl116] trl 1.16.0 on transformers 5.24.0, and their dependencies"
"$pip" install -q -c "$constraints" "trl==1.16.0" "transformers==5.24.0" "datasets" "accelerate" "vaderSentiment==3.3.2" "numpy<2.3" "psutil"
"$venv/bin/python" - <<'PY'
import torch, transformers, trl
from trl import GRPOConfig, GRPOTrainer  # noqa: F401
print(f"[setup_trl116] ok: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
