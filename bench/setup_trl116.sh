#!/usr/bin/env bash
# Create or refresh bench/.venv-trl116: TRL 1.16's GRPOTrainer (trl 1.16.0), the maintained trainer, for
# workload (c) and the response-length curves. transformers is pinned to 5.24.0, a version tether runs, so both
# sides run the same GPT-2 / Llama modelling code (bench/peer_venv.sh pins torch 2.13.0 first). No vLLM: TRL
# generates with transformers' `generate` (use_vllm=False).
set -euo pipefail
exec bash "$(dirname "$0")/peer_venv.sh" .venv-trl116 "from trl import GRPOConfig, GRPOTrainer" \
    "trl==1.16.0" "transformers==5.24.0" "datasets" "accelerate" "vaderSentiment==3.3.2" "numpy<2.3" "psutil"
