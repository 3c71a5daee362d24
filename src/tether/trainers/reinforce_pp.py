"""REINFORCE++ (Hu 2025): no critic; the per-token reward (score at the last token, -beta * KL on every
token) is summed into discounted returns-to-go, and those are whitened over the whole batch
(whiten_advantages, on by default). With num_generations > 1 each score first loses its prompt's mean
(the "baseline" variant)."""

import torch
from torch import Tensor

from tether.ops import gae, group_centred, masked_whiten
from tether.ops.rewards import shape_rewards
from tether.trainers.base import RLTrainer, Scored


class ReinforcePPTrainer(RLTrainer):
    algorithm = "reinforce++"

    def advantages(self, batch: Scored, scores: Tensor, kl_coef: float) -> tuple[Tensor, None, Tensor]:
        c = self.config
        if c.num_generations > 1:
            scores = group_centred(scores, c.num_generations)
        rewards, non_score = shape_rewards(scores, batch.kl, batch.mask, kl_coef)
        if c.whiten_rewards:
            rewards = masked_whiten(rewards, batch.mask, shift_mean=False, all_reduce=self.ranks.all_reduce)
        # GAE with V = 0 and lambda = 1 is exactly the discounted return-to-go: one copy of the recursion.
        returns_to_go, _ = gae(rewards, torch.zeros_like(rewards), batch.mask, c.gamma, 1.0)
        return returns_to_go, None, non_score
