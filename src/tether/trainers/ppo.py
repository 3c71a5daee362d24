"""PPO (Schulman et al. 2017) as in Ziegler et al. 2019: the KL enters the per-token reward, a critic
gives GAE advantages and is trained on the GAE returns."""

from torch import Tensor

from tether.ops import gae, masked_whiten
from tether.ops.rewards import shape_rewards
from tether.trainers.base import Generation, RLTrainer, Scored

__all__ = ["Generation", "PPOTrainer"]


class PPOTrainer(RLTrainer):
    algorithm = "ppo"
    uses_critic = True

    def advantages(self, batch: Scored, scores: Tensor, kl_coef: float) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        rewards, non_score = shape_rewards(scores, batch.kl, batch.mask, kl_coef)
        if c.whiten_rewards:
            rewards = masked_whiten(rewards, batch.mask, shift_mean=False, all_reduce=self.ranks.all_reduce)
        advantages, returns = gae(rewards, batch.values, batch.mask, c.gamma, c.lam)
        return advantages, returns, non_score
