"""GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1): no critic; each completion's advantage is its reward
standardised within the group of completions of the same prompt, on every one of its tokens. The KL sits in
the loss by default (k3); with kl_in_loss=false it is summed into the sequence reward before grouping."""

from torch import Tensor

from tether.ops import group_normalised
from tether.trainers.base import RLTrainer, Scored, sequence_advantages


class GRPOTrainer(RLTrainer):
    algorithm = "grpo"

    def advantages(self, batch: Scored, scores: Tensor, kl_coef: float) -> tuple[Tensor, None, Tensor]:
        return sequence_advantages(batch, scores, kl_coef, lambda r: group_normalised(r, self.config.num_generations))
