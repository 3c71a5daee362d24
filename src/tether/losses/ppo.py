"""The terms of the update's loss, each a pure function over one (micro-)batch: the policy-gradient surrogate (its
importance ratio and its objective chosen once from the config), the clipped value loss, the KL term and the
entropy bonus.

Every term is a weighted sum of per-token values: `weights` (B, T) are the loss aggregation's per-token weights
(losses/aggregation.py; zero outside the loss mask), `stat_weights` the token-mean weights that the detached
statistics use. Both default to a token mean over `mask`. Because the weights are normalised over the whole
minibatch (on every process) before it is split, accumulated micro-batches give exactly one big minibatch's loss.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from tether.ops.masks import masked_var


def _token_mean_weights(mask: Tensor) -> Tensor:
    return mask / mask.sum().clamp(min=1)


def _weighted(x: Tensor, weights: Tensor) -> Tensor:
    """sum(weights * x) with x's masked-out entries (possibly inf or nan: padding) never touching the sum."""
    return (weights * torch.where(weights != 0, x, torch.zeros_like(x))).sum()


# ---- importance ratios (config `importance_ratio`) -------------------------------------------------------
def token_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log r_t = log pi(a_t) - log pi_old(a_t), per token (PPO, Schulman et al. 2017)."""
    return logprobs - old_logprobs


def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO (Zheng et al. 2025, eq. 7): log s_i = (1/|y_i|) sum_t log r_t, the length-normalised sequence
    log-ratio, on every token of the sequence; its gradient reaches every token (TRL's
    importance_sampling_level="sequence")."""
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))
    per_sequence = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return per_sequence.expand_as(logprobs)


# ---- per-token policy objectives (config `policy_loss`) ---------------------------------------------------
def clipped_surrogate(logprobs: Tensor, log_ratio: Tensor, advantages: Tensor, low: float, high: float,
                      dual_clip: float | None) -> tuple[Tensor, Tensor]:
    """max(-A r, -A clip(r, 1 - low, 1 + high)) (Schulman et al. 2017, eq. 7; low != high is DAPO's clip-higher,
    Yu et al. 2025). With dual_clip c, a negative advantage's loss is at most -A c (Ye et al. 2020; veRL's
    clip_ratio_c), so a ratio far above 1 on a bad token cannot make the step unbounded.
    Returns the per-token loss and where the clip decided it."""
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        was_clipped = was_clipped | dual
    return loss, was_clipped


def cispo(logprobs: Tensor, log_ratio: Tensor, advantages: Tensor, low: float, high: float,
          dual_clip: float | None) -> tuple[Tensor, Tensor]:
    """CISPO (MiniMax-M1, Chen et al. 2025, eq. 4): -sg(min(r, 1 + high)) A log pi(a): the importance weight is
    capped and detached, so every token keeps a gradient (no token is clipped out of the update). Only the
    upper bound is used, as in the paper's experiments and TRL's loss_type="cispo" (whose epsilon_high is the cap
    itself, 1 + high here). A token the updated top-k / top-p no longer keeps (log pi = -inf) contributes 0."""
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, max=1.0 + high).detach()
    loss = -weight * advantages * torch.where(torch.isfinite(logprobs), logprobs, torch.zeros_like(logprobs))
    return loss, ratio > 1.0 + high


Objective = Callable[[Tensor, Tensor, Tensor, float, float, float | None], tuple[Tensor, Tensor]]
RATIOS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {"token": token_log_ratio,
                                                                 "sequence": sequence_log_ratio}
OBJECTIVES: dict[str, Objective] = {"ppo": clipped_surrogate, "cispo": cispo}


def policy_loss(
    logprobs: Tensor,  # (B, T) log pi_theta(a_t | s_t), sampling-processed, with grad
    old_logprobs: Tensor,  # (B, T) the same under the policy that generated the rollout
    advantages: Tensor,  # (B, T)
    mask: Tensor,  # (B, T)
    cliprange: float,  # the lower clip (1 - cliprange); also the upper one unless cliprange_high is given
    cliprange_high: float | None = None,
    dual_clip: float | None = None,
    *,
    ratio: Callable[[Tensor, Tensor, Tensor], Tensor] = token_log_ratio,
    objective: Objective = clipped_surrogate,
    weights: Tensor | None = None,  # (B, T) aggregation weights; default: token mean over mask
    stat_weights: Tensor | None = None,  # (B, T) for the statistics; default: token mean over mask
) -> tuple[Tensor, dict[str, Tensor]]:
    """sum(weights * objective(...)) and detached statistics (token means under stat_weights)."""
    weights = _token_mean_weights(mask) if weights is None else weights
    stat_weights = _token_mean_weights(mask) if stat_weights is None else stat_weights
    log_ratio = ratio(logprobs, old_logprobs, mask)
    high = cliprange if cliprange_high is None else cliprange_high
    per_token, was_clipped = objective(logprobs, log_ratio, advantages, cliprange, high, dual_clip)
    loss = _weighted(per_token, weights)
    with torch.no_grad():
        # With top-k / top-p a sampled token can leave the updated policy's support: ratio 0 is the
        # right importance weight, but log_ratio = -inf would make these diagnostics inf.
        finite_log_ratio = log_ratio.clamp(-20.0, 20.0)
        stats = {
            "approxkl": _weighted(0.5 * finite_log_ratio**2, stat_weights),
            "policykl": _weighted(-finite_log_ratio, stat_weights),
            "clipfrac": _weighted(was_clipped.float(), stat_weights),
            "ratio_mean": _weighted(torch.exp(log_ratio), stat_weights),
            # sampled tokens the updated policy's top-k / top-p no longer keeps (ratio 0)
            "left_support_frac": _weighted(torch.isneginf(logprobs).float(), stat_weights),
            "loss": loss.detach(),
        }
    return loss, stats


def kl_penalty(
    logprobs: Tensor,  # (B, T) log pi_theta,T(a_t | s_t): temperature only, untruncated, with grad
    ref_logprobs: Tensor,  # (B, T) log ref_T(a_t | s_t), the same processing
    mask: Tensor,  # (B, T)
    estimator: Callable[[Tensor, Tensor], Tensor],  # a per-token estimator of tether.ops.kl
    *,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The KL term of the loss (kl_in_loss): sum(weights * estimator(logprobs, ref_logprobs)).

    It compares the policy and the reference at the sampling temperature, both untruncated, not the
    top-k / top-p sampling distribution: a sampled token can leave the updated policy's truncated support
    (log-prob -inf), where k3 is nan and k2 / abs are inf, whereas both untruncated distributions give every
    token mass, so every estimator is finite by construction. It is also the divergence the loss can steer
    smoothly: the truncated support moves in jumps. (TRL's GRPOTrainer and veRL likewise take the KL term
    from temperature-scaled, untruncated log-probs.)"""
    weights = _token_mean_weights(mask) if weights is None else weights
    kl = _weighted(estimator(logprobs, ref_logprobs), weights)
    return kl, {"loss": kl.detach()}


def value_loss(
    values: Tensor,  # (B, T) V_theta(s_t), with grad
    old_values: Tensor,  # (B, T) V at rollout time
    returns: Tensor,  # (B, T) GAE returns, the regression target
    mask: Tensor,  # (B, T)
    cliprange_value: float,
    *,
    weights: Tensor | None = None,
    stat_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5 max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-cliprange_value) (OpenAI baselines
    ppo2), aggregated like the policy loss."""
    weights = _token_mean_weights(mask) if weights is None else weights
    stat_weights = _token_mean_weights(mask) if stat_weights is None else stat_weights
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err_unclipped = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = _weighted(0.5 * torch.maximum(err_unclipped, err_clipped), weights)
    with torch.no_grad():
        stats = {
            "clipfrac": _weighted((err_clipped > err_unclipped).float(), stat_weights),
            "vpred": _weighted(values, stat_weights),
            "loss": loss.detach(),
        }
    return loss, stats


def entropy_bonus(entropy: Tensor, mask: Tensor, *, weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """-sum(weights * H_t): minimising it raises the entropy of the sampling distribution (entropy_coef; the
    entropy term of Schulman et al. 2017, eq. 9, as veRL's entropy_coeff)."""
    weights = _token_mean_weights(mask) if weights is None else weights
    bonus = -_weighted(entropy, weights)
    return bonus, {"loss": bonus.detach()}


def explained_variance(pred: Tensor, target: Tensor, mask: Tensor, all_reduce=None) -> Tensor:
    """1 - Var[target - pred] / Var[target] over the mask: 1 is perfect, 0 is a constant guess.
    all_reduce: a sum over processes, for the statistic over every process's tokens."""
    var_target = masked_var(target, mask, unbiased=False, all_reduce=all_reduce)
    if var_target == 0:
        return torch.tensor(float("nan"))
    return 1.0 - masked_var(target - pred, mask, unbiased=False, all_reduce=all_reduce) / var_target
