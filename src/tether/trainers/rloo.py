"""RLOO (Ahmadian et al. 2024): no critic; each completion's advantage is its reward minus the mean
reward of the other completions of its prompt, on every one of its tokens. The KL is summed into the
sequence reward by default (kl_in_loss=false)."""

from torch import Tensor

from tether.ops import leave_one_out
from tether.trainers.base import RLTrainer, Scored, sequence_advantages


class RLOOTrainer(RLTrainer):
    algorithm = "rloo"

    def advantages(self, batch: Scored, scores: Tensor, kl_coef: float) -> tuple[Tensor, None, Tensor]:
        return sequence_advantages(batch, scores, kl_coef, lambda r: leave_one_out(r, self.config.num_generations))
