"""Per-token KL estimators between the policy (as sampled) and the reference.

With a ~ pi, r = log pi(a) - log ref(a):  (Schulman, "Approximating KL divergence", 2020)
  kl  (k1) = r                     unbiased, per-sample negative
  abs      = |r|                   biased, >= 0
  mse (k2) = r^2 / 2               biased, >= 0, low variance
  k3       = exp(-r) - 1 + r       >= 0; unbiased only when pi and ref share support
  kl_full  = sum_v pi(v) (log pi(v) - log ref(v))   exact per-token KL, >= 0 (objective/kl, the controller)

k3 under truncated sampling: E_pi[k3] = KL - (1 - ref(S)), with S the tokens pi can sample, so with
top-k / top-p it underestimates by the reference's mass outside S. k1 and kl_full have no such bias.

Which estimator is gradient-correct where (docs/kl.md): in the reward, where the policy gradient sees only the
value at the sampled token, only k1 gives E[grad log pi(a) * k(a)] = grad KL. The exact KL does not depend on
the sampled token, so as a reward it gives that token no gradient at all: it is not an estimator choice, only
what tether reports and steers. In the loss, k1's expected gradient is zero; k2 gives grad KL(pi || ref) and k3
grad KL(ref || pi).
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
    """A KL estimator chosen once at set-up: (logprobs, ref_logprobs) of the sampled tokens (B, T) -> (B, T)."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]


ESTIMATORS: dict[str, KLEstimator] = {
    "kl": KLEstimator("kl", kl_k1),
    "k1": KLEstimator("k1", kl_k1),
    "abs": KLEstimator("abs", kl_abs),
    "mse": KLEstimator("mse", kl_mse),
    "k2": KLEstimator("k2", kl_mse),
    "k3": KLEstimator("k3", kl_k3),
}

# `kl_estimator: full` used to put the exact KL in the reward; the config refuses it with this reason.
FULL_REFUSED = ("kl_estimator=full is refused: the exact per-token KL does not depend on the sampled token, so as "
                "a reward its policy gradient at that token is zero (only later tokens feel it, and the last token "
                "of every completion gets no KL pull at all). Use kl (k1, the default in the reward; its "
                "gradient is the KL's gradient). The exact KL is always what objective/kl reports and what the "
                "adaptive controller steers, whatever the estimator")
# Estimators whose value is a fine KL estimate but whose policy gradient as a reward is not the KL's.
BIASED_IN_REWARD = ("abs", "mse", "k2", "k3")


def get_estimator(name: str) -> KLEstimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]
