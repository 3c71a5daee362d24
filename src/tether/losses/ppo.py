"""Clipped PPO losses (Schulman et al. 2017, eq. 7; value clipping as in OpenAI baselines ppo2).

Both are token-level means over the mask and return (loss, stats) with detached stats.
`scale` multiplies the loss only: gradient accumulation passes (tokens in this micro-batch) /
(tokens in the whole minibatch) so that accumulated micro-batches equal one big minibatch.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from tether.ops.masks import masked_mean, masked_var


def policy_loss(
    logprobs: Tensor,  # (B, T) log pi_theta(a_t | s_t), sampling-processed, with grad
    old_logprobs: Tensor,  # (B, T) the same under the policy that generated the rollout
    advantages: Tensor,  # (B, T)
    mask: Tensor,  # (B, T)
    cliprange: float,
    scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        # With top-k / top-p a sampled token can leave the updated policy's support: ratio 0 is the
        # right importance weight, but log_ratio = -inf would make these diagnostics inf.
        finite_log_ratio = log_ratio.clamp(-20.0, 20.0)
        stats = {
            "approxkl": 0.5 * masked_mean(finite_log_ratio**2, mask),
            "policykl": masked_mean(-finite_log_ratio, mask),
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
            # sampled tokens the updated policy's top-k / top-p no longer keeps (ratio 0)
            "left_support_frac": masked_mean(torch.isneginf(logprobs).float(), mask),
            "loss": loss.detach(),
        }
    return loss * scale, stats


def kl_penalty(
    logprobs: Tensor,  # (B, T) log pi_theta,T(a_t | s_t): temperature only, untruncated, with grad
    ref_logprobs: Tensor,  # (B, T) log ref_T(a_t | s_t), the same processing
    mask: Tensor,  # (B, T)
    estimator: Callable[[Tensor, Tensor], Tensor],  # a per-token estimator of tether.ops.kl
    scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The KL term of the loss (kl_in_loss): token mean of estimator(logprobs, ref_logprobs).

    It compares the policy and the reference at the sampling temperature, both untruncated, not the
    top-k / top-p sampling distribution: a sampled token can leave the updated policy's truncated support
    (log-prob -inf), where k3 is nan and k2 / abs are inf, whereas both untruncated distributions give every
    token mass, so every estimator is finite by construction. It is also the divergence the loss can steer
    smoothly: the truncated support moves in jumps. (TRL's GRPOTrainer and veRL likewise take the KL term
    from temperature-scaled, untruncated log-probs.)"""
    kl = masked_mean(estimator(logprobs, ref_logprobs), mask)
    return kl * scale, {"loss": kl.detach()}


def value_loss(
    values: Tensor,  # (B, T) V_theta(s_t), with grad
    old_values: Tensor,  # (B, T) V at rollout time
    returns: Tensor,  # (B, T) GAE returns, the regression target
    mask: Tensor,  # (B, T)
    cliprange_value: float,
    scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err_unclipped = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((err_clipped > err_unclipped).float(), mask),
            "vpred": masked_mean(values, mask),
            "loss": loss.detach(),
        }
    return loss * scale, stats


def explained_variance(pred: Tensor, target: Tensor, mask: Tensor, all_reduce=None) -> Tensor:
    """1 - Var[target - pred] / Var[target] over the mask: 1 is perfect, 0 is a constant guess.
    all_reduce: a sum over processes, for the statistic over every process's tokens."""
    var_target = masked_var(target, mask, unbiased=False, all_reduce=all_reduce)
    if var_target == 0:
        return torch.tensor(float("nan"))
    return 1.0 - masked_var(target - pred, mask, unbiased=False, all_reduce=all_reduce) / var_target
