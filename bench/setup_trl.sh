#!/usr/bin/env bash
# Create or refresh bench/.venv-trl: TRL's classic PPOTrainer (trl 0.11.4) on transformers 4.46,
# the generation of TRL the training FAQ was written for (bench/peer_venv.sh pins torch 2.13.0 first).
set -euo pipefail
exec bash "$(dirname "$0")/peer_venv.sh" .venv-trl \
    "from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # the classic API" \
    "trl==0.11.4" "transformers==4.46.*" "tokenizers>=0.20,<0.21" "accelerate==1.0.1" \
    "datasets==3.0.2" "vaderSentiment==3.3.2" "numpy<2.3" "rich" "psutil"
