"""How the global batch splits over the processes: sizes, minibatches and random streams per rank.

Sizes are global: `batch_size` rollouts per step and `minibatch_size` rows per optimiser step over all processes
together. Rank r of N owns rows r*B/N .. (r+1)*B/N of the global batch and its share of every minibatch.
These are plain functions of their arguments: no process group, no communication.
"""

import torch
from torch import Tensor


def check_sizes(batch_size: int, minibatch_size: int, num_processes: int,
                gradient_accumulation_steps: int = 1, group_size: int = 1) -> tuple[int, int]:
    """The per-process (batch, minibatch) sizes for global sizes on num_processes; a clear error where the
    global sizes do not split evenly (an uneven split would weight some processes' rollouts more).

    group_size: completions per prompt (num_generations), laid out prompt by prompt; each process must hold
    whole groups, so that group baselines (GRPO, RLOO) need no communication."""
    for name, size in (("batch_size", batch_size), ("minibatch_size", minibatch_size)):
        if size % num_processes:
            raise ValueError(f"{name}={size} is global and must split evenly over {num_processes} processes; "
                             f"use a multiple of {num_processes}")
    if (batch_size // num_processes) % group_size:
        raise ValueError(f"batch_size={batch_size} over {num_processes} processes is {batch_size // num_processes} "
                         f"rollouts each, which would split a group of num_generations={group_size}; use a "
                         f"multiple of {num_processes * group_size}")
    local_mb = minibatch_size // num_processes
    if local_mb % gradient_accumulation_steps:
        raise ValueError(f"minibatch_size={minibatch_size} over {num_processes} processes is {local_mb} rows each, "
                         f"which gradient_accumulation_steps={gradient_accumulation_steps} does not divide")
    return batch_size // num_processes, local_mb


def rank_minibatches(local_batch: int, local_minibatch: int, generator: torch.Generator, rank: int,
                     num_processes: int) -> list[Tensor]:
    """This rank's share of each global minibatch, as indices into its local rows.

    Every rank draws one permutation per rank from the same generator (so generator states stay equal across
    ranks) and splits its own. Global minibatch k is the union over ranks of their k-th pieces, every rank
    holding exactly local_minibatch rows of it. With one process this is `randperm(B).split(mb)`, the
    single-process partition, draw for draw."""
    perms = [torch.randperm(local_batch, generator=generator) for _ in range(num_processes)]
    return list(perms[rank].split(local_minibatch))


def rank_seed(seed: int, rank: int) -> int:
    """Seed for a per-process random stream (sampling, dropout); rank 0 keeps `seed`, so a one-process run
    samples as before. Streams that must agree across ranks (prompt order, minibatch partition) use `seed`."""
    return seed + 1_000_003 * rank
