"""Per-token KL estimators between the policy (as sampled) and the reference.

With a ~ pi, r = log pi(a) - log ref(a):  (Schulman, "Approximating KL divergence", 2020)
  kl  (k1) = r                     unbiased, per-sample negative
  abs      = |r|                   biased, >= 0
  mse (k2) = r^2 / 2               biased, >= 0, low variance
  k3       = exp(-r) - 1 + r       >= 0; unbiased only when pi and ref share support
  full     = sum_v pi(v) (log pi(v) - log ref(v))   exact per-token KL, >= 0

k3 under truncated sampling: E_pi[k3] = KL - (1 - ref(S)), with S the tokens pi can sample, so with
top-k / top-p it underestimates by the reference's mass outside S. k1 and full have no such bias.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


def kl_abs(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return (logprobs - ref_logprobs).abs()


def kl_mse(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_ratio = ref_logprobs - logprobs  # log(ref / pi)
    return torch.expm1(log_ratio) - log_ratio


def kl_full(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact KL(softmax(logits) || softmax(ref_logits)) per position: (..., V) -> (...).

    logits are the policy's processed logits (may hold -inf where the sampler filtered);
    ref_logits must be finite. Terms with pi(v) = 0 contribute 0.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    p = logp.exp()
    if not (torch.is_grad_enabled() and (logits.requires_grad or ref_logits.requires_grad)):
        # In place on the two log-softmax buffers (3 (..., V) allocations instead of 7). -inf becomes the most
        # negative float first, so a p = 0 term is 0 * finite = 0, as the where() below makes it.
        tiny = torch.finfo(logp.dtype).min
        log_ratio = torch.sub(logp.clamp_(min=tiny), logq.clamp_(min=tiny), out=logq)
        return log_ratio.mul_(p).sum(-1).clamp_(min=0.0)
    log_ratio = torch.where(p > 0, logp - logq, torch.zeros_like(logp))  # before the product: no 0 * -inf in backward
    return (p * log_ratio).sum(-1).clamp(min=0.0)  # clamp only float round-off; the sum is >= 0 exactly


class KLEstimator(NamedTuple):
    """A KL estimator chosen once at set-up. needs_logits: takes (logits, ref_logits) (B, T, V)
    instead of the sampled tokens' (logprobs, ref_logprobs) (B, T)."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    needs_logits: bool = False


ESTIMATORS: dict[str, KLEstimator] = {
    "kl": KLEstimator("kl", kl_k1),
    "k1": KLEstimator("k1", kl_k1),
    "abs": KLEstimator("abs", kl_abs),
    "mse": KLEstimator("mse", kl_mse),
    "k2": KLEstimator("k2", kl_mse),
    "k3": KLEstimator("k3", kl_k3),
    "full": KLEstimator("full", kl_full, needs_logits=True),
}


def get_estimator(name: str) -> KLEstimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]
