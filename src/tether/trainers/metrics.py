"""Step 7's metrics: one step's numbers over every process's rollouts (docs/run-folder.md lists them)."""

import torch
from torch import Tensor

from tether.collectives import Collectives
from tether.losses.ppo import explained_variance
from tether.ops import masked_mean
from tether.rollout.batch import Rollouts
from tether.trainers.setup import eos_rate


def kl_per_sequence(b: Rollouts) -> Tensor:
    """(B,) sum_t KL(pi(.|s_t) || ref(.|s_t)) along each sampled completion. By the chain rule this is an unbiased,
    never-negative estimate of the sequence-level KL (the sampled estimators' Rao-Blackwellisation)."""
    return b.kl_exact.sum(-1)


def gather_per_sequence(comm: Collectives, b: Rollouts, raw_scores: Tensor, scores: Tensor) -> dict[str, Tensor]:
    """Per-completion values of every process, (B_global,) each: the reward's scores, the scores after
    missing_eos_penalty, the exact and the estimated KL, the KL part of the reward, the length."""
    columns = {"raw": raw_scores, "scores": scores, "kl": kl_per_sequence(b), "estimate": b.kl.sum(-1),
               "non_score": b.non_score.sum(-1), "length": b.mask.sum(-1)}
    gathered = comm.gather(torch.stack([v.to(b.mask.device) for v in columns.values()], 1)).T
    return dict(zip(columns, gathered))


def step_metrics(comm: Collectives, b: Rollouts, seqs: dict[str, Tensor], beta: float, learning_rate: float,
                 eos_token_ids: list[int], support_flips: int, train_stats: dict) -> dict[str, float]:
    """The headline numbers (TRL's names where they exist) from the batch after its update."""

    def token_mean(x: Tensor) -> float:
        return masked_mean(x, b.mask, all_reduce=comm.all_reduce).item()

    def process_sum(x: float) -> float:
        return comm.all_reduce(torch.tensor([x], dtype=torch.float64, device=b.mask.device)).item()

    raw = seqs["raw"]
    return {
        "env/reward_mean": raw.mean().item(),  # what the reward said
        "env/reward_std": raw.std().item() if len(raw) > 1 else 0.0,
        "objective/kl": seqs["kl"].mean().item(),
        "objective/kl_estimate": seqs["estimate"].mean().item(),
        "objective/kl_coef": beta,
        "objective/entropy": token_mean(b.entropy),
        "objective/scores": seqs["scores"].mean().item(),  # after missing_eos_penalty
        "objective/non_score_reward": seqs["non_score"].mean().item(),
        "ppo/advantages/mean": token_mean(b.advantages),
        **({"ppo/returns/mean": token_mean(b.returns),  # how well the rollout-time values predicted the returns
            "ppo/val/var_explained": explained_variance(b.values, b.returns, b.mask, comm.all_reduce).item()}
           if b.returns is not None else {}),
        "ppo/learning_rate": learning_rate,
        "tokens/response_len_mean": seqs["length"].mean().item(),
        "tokens/eos_rate": process_sum(eos_rate(b.response_ids, b.mask, eos_token_ids)) / comm.num,
        "rollout/support_flips": process_sum(float(support_flips)),
        **train_stats,
    }
