"""Generalised advantage estimation (Schulman et al. 2016, eq. 11-16)."""

import torch
from torch import Tensor

from tether.ops.masks import masked_var


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE over response tokens.

    rewards, values, mask: (B, T). The episode ends at the last masked token: the value after
    it is 0 (no bootstrap), and nothing flows back from masked-out positions.
    Returns (advantages, returns), both (B, T) and 0 outside the mask; returns = A + V.
    """
    rewards, values = rewards * mask, values * mask
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_alive = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value * next_alive - values[:, t]
        last = delta + gamma * lam * next_alive * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def _groups(scores: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B / G, G): rows k*G .. k*G + G - 1 are the completions of one prompt."""
    if scores.dim() != 1 or len(scores) % group_size:
        raise ValueError(f"scores must be (B,) with B a multiple of the group size {group_size}, "
                         f"got shape {tuple(scores.shape)}")
    return scores.reshape(-1, group_size)


def group_normalised(scores: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024, sec. 4.1.2): (r_i - mean(group)) / (std(group) + eps), std with Bessel's
    correction. A group whose completions all scored the same gets advantage 0. (B,) -> (B,)."""
    if group_size < 2:
        raise ValueError(f"group normalisation needs at least 2 completions per prompt, got {group_size}")
    g = _groups(scores, group_size)
    return ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + eps)).reshape(-1)


def leave_one_out(scores: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024, eq. 5): r_i minus the mean of the other G - 1 scores of its prompt;
    the baseline never sees r_i, so the estimate stays unbiased. (B,) -> (B,)."""
    if group_size < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 completions per prompt, got {group_size}")
    g = _groups(scores, group_size)
    return (g - (g.sum(-1, keepdim=True) - g) / (group_size - 1)).reshape(-1)


def group_centred(scores: Tensor, group_size: int) -> Tensor:
    """r_i minus its prompt's mean score (REINFORCE++ with a baseline). (B,) -> (B,)."""
    g = _groups(scores, group_size)
    return (g - g.mean(-1, keepdim=True)).reshape(-1)


def batch_scaled(scores: Tensor, group_size: int, all_reduce=None, eps: float = 1e-6) -> Tensor:
    """(r_i - mean(group)) / (std(batch) + eps): centred in its group, scaled by the std of every score in the
    batch (on every process, through `all_reduce`, a sum over processes), with Bessel's correction. TRL's
    scale_rewards="batch". (B,) -> (B,)."""
    var = masked_var(scores, torch.ones_like(scores), unbiased=True, all_reduce=all_reduce)
    return group_centred(scores, group_size) / (var.sqrt() + eps)
