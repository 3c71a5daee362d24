"""Generalised advantage estimation (Schulman et al. 2016, eq. 11-16)."""

import torch
from torch import Tensor


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
