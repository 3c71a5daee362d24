"""Reward shaping: R_t = -beta * KL_t on every response token, plus the score at the last one
(Ziegler et al. 2019, eq. 2; the FAQ's R = r - beta * KL spread over tokens)."""

import torch
from torch import Tensor


def shape_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """scores: (B,) one scalar per completion; kl, mask: (B, T).

    Returns (rewards, non_score_rewards), both (B, T): non_score = -kl_coef * kl on masked
    tokens, rewards = non_score with the score added at each row's last masked token.
    """
    non_score = -kl_coef * kl * mask
    lengths = mask.sum(-1).long()
    if (lengths < 1).any():
        raise ValueError("every response needs at least one token in the mask to receive its score")
    last = lengths - 1
    rewards = non_score.clone()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores.to(rewards.dtype)
    return rewards, non_score


def process_scores(scores: Tensor, scale: float, clip: float | None, moments: "RunningMoments | None" = None,
                   gather=None) -> Tensor:
    """score_scale, then score_norm (moments given: updated with `gather(scores)`, every process's scores, then
    the running mean removed and the running std divided out), then score_clip."""
    scores = scores * scale
    if moments is not None:
        moments.update(gather(scores))
        scores = (scores - moments.mean) / max(moments.std, 1e-8)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


class RunningMoments:
    """Running mean / std of scores across steps (Chan et al. parallel variance update).

    Used to normalise scores to unit scale so that kl_coef means the same across reward models.
    """

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, x: Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return max(self.var, 0.0) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
