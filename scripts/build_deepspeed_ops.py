"""Compile DeepSpeed's CPU shared-memory collective once, in one process.

Without a GPU, each DeepSpeed process compiles this op on first use. Two processes of one launch compiling it
at the same time have aborted a rank ("terminate called without an active exception"), so scripts/setup.sh
and the 2-process tests build it here first. Nothing to do on a machine with CUDA, or without DeepSpeed.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed picks without a GPU, minus its warning
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        raise SystemExit(0)
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
