"""Rollout correction: importance weights between the engine that sampled and the trainer that scores.

With vLLM as the rollout engine the tokens are sampled by vLLM's kernels and scored by the trainer's: the same
weights and the same sampling processing (tether replays it), but different arithmetic, so the two log-probs of a
sampled token differ by a little. Write mu for the engine's distribution (the behaviour policy that really
sampled) and pi_old for the trainer's replay of it before the update (`Rollouts.logprobs`). The PPO ratio
pi_theta / pi_old stays as it is (the trust region is about the trainer's own policy); the gradient is an
expectation under pi_old, but the samples came from mu, so each token's loss is weighted by
rho = pi_old / mu (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training":
truncated importance sampling, TIS, with cap C = 2; the decoupled objective of Hilton et al. 2022). The weight
is a constant (no gradient) and is bounded by the cap: truncated (min(rho, C), TIS) or masked (0 above C, MIS,
"masked importance sampling"), per token or per sequence (rho of a sequence is the product of its tokens').

Peers: TRL's GRPOTrainer corrects by default with vLLM (`vllm_importance_sampling_correction`; TIS with cap 2 at
first, sequence-level masking with cap 3 since); veRL's `algorithm.rollout_correction` (`rollout_is` token or
sequence, `rollout_is_threshold` 2.0, truncation; `rollout_rs` for masking) is off unless set. tether defaults
to token-level TIS with cap 2, the paper's and veRL's threshold.

Pure functions of tensors and masks; `CORRECTIONS` maps the config's `rollout_correction` to one of them."""

from collections.abc import Callable

import torch
from torch import Tensor

# exp() of a log-ratio beyond this is capped before it can overflow (veRL bounds its weights the same way)
_LOG_BOUND = 20.0


def token_log_rho(logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log rho_t = log pi_old(a_t) - log mu(a_t) per token (B, T), 0 outside mask."""
    return torch.where(mask.bool(), logprobs - engine_logprobs, torch.zeros_like(logprobs)).clamp(-_LOG_BOUND,
                                                                                                   _LOG_BOUND)


def sequence_log_rho(logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log rho of each whole sequence, sum_t log rho_t, on every one of its tokens (B, T)."""
    per_token = torch.where(mask.bool(), logprobs - engine_logprobs, torch.zeros_like(logprobs))
    return per_token.sum(-1, keepdim=True).clamp(-_LOG_BOUND, _LOG_BOUND).expand_as(logprobs)


def truncated(log_rho: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """TIS: min(rho, cap). Returns the weights and where the cap acted."""
    rho = log_rho.exp()
    return rho.clamp(max=cap), rho > cap


def masked(log_rho: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """MIS: rho where rho <= cap, 0 above it (the token, or the sequence, leaves the loss)."""
    rho = log_rho.exp()
    return torch.where(rho > cap, torch.zeros_like(rho), rho), rho > cap


LEVELS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {"token": token_log_rho,
                                                                 "sequence": sequence_log_rho}
BOUNDS: dict[str, Callable[[Tensor, float], tuple[Tensor, Tensor]]] = {"tis": truncated, "mis": masked}


def correction_weights(logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, level: str, bound: str,
                       cap: float) -> tuple[Tensor, Tensor]:
    """(B, T) detached importance weights of the policy loss (1 outside mask) and (B, T) bool where the cap acted.
    level: token | sequence; bound: tis | mis (chosen once from the config, see `CORRECTIONS`)."""
    with torch.no_grad():
        weights, capped = BOUNDS[bound](LEVELS[level](logprobs, engine_logprobs, mask), cap)
        inside = mask.bool()
        return torch.where(inside, weights, torch.ones_like(weights)), capped & inside


def mismatch_stats(logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, flipped: Tensor,
                   all_reduce=None, gather=None) -> dict[str, Tensor]:
    """How far the trainer's log-probs of the sampled tokens are from the engine's, over the tokens of `mask`
    (of every process, given all_reduce, a sum over processes, and gather, a concatenation over them):

    - mismatch_kl: KL(mu || pi_old) per token, estimated on the sampled tokens (a ~ mu) with k3,
      rho - 1 - log rho (Schulman 2020): unbiased and never negative;
    - mismatch_max_gap: the largest |log pi_old(a_t) - log mu(a_t)|;
    - outside_support: the share of sampled tokens the trainer's replay of top-k / top-p puts outside the
      support (`Rollouts.flipped`, scored untruncated instead)."""
    with torch.no_grad():
        m = mask.bool()
        log_rho = torch.where(m, logprobs - engine_logprobs, torch.zeros_like(logprobs)).double()
        k3 = torch.where(m, log_rho.clamp(max=_LOG_BOUND).exp() - 1 - log_rho, torch.zeros_like(log_rho))
        gap = log_rho.abs().amax().reshape(1) if log_rho.numel() else log_rho.new_zeros(1)
        sums = torch.stack([k3.sum(), (flipped & m).double().sum(), m.double().sum()])
        if all_reduce is not None:
            sums = all_reduce(sums)
        if gather is not None:
            gap = gather(gap)
        n = sums[2].clamp(min=1)
        return {"mismatch_kl": sums[0] / n, "mismatch_max_gap": gap.max(), "outside_support": sums[1] / n}
