"""Step 3b: the engine's behaviour log-probs beside the trainer's. After scoring, the batch gets the log-probs the
rollout engine reported for its sampled tokens (`Rollouts.engine_logprobs`), the rollout correction's importance
weights when `rollout_correction` is on (`Rollouts.correction`, losses/correction.py), and the step logs how far
engine and trainer disagree: rollout/mismatch_kl, rollout/mismatch_max_gap, rollout/outside_support, and with a
correction rollout/correction_mean and rollout/correction_capped_frac."""

from dataclasses import replace
from functools import partial

import torch
from torch import Tensor

from tether.losses.correction import correction_weights, mismatch_stats
from tether.ops import masked_mean
from tether.rollout.batch import Rollouts


def correction_for(c):
    """(logprobs, engine_logprobs, mask) -> (weights, capped), or None with rollout_correction=none: chosen once."""
    if c.rollout_correction == "none":
        return None
    return partial(correction_weights, level=c.rollout_correction_level, bound=c.rollout_correction,
                   cap=c.rollout_correction_cap)


def with_behaviour(batch: Rollouts, engine_logprobs: list[Tensor] | None, correction, comm
                   ) -> tuple[Rollouts, dict[str, float]]:
    """The batch with the engine's log-probs (and the correction weights when `correction` is given), and the
    mismatch metrics over every process's tokens. engine_logprobs: each (T_i,), one per response, None when the
    responses came from elsewhere (step() without them): the batch is returned as it is."""
    if engine_logprobs is None:
        return batch, {}
    B, T = batch.response_ids.shape
    if len(engine_logprobs) != B or any(len(lp) > T for lp in engine_logprobs):
        raise ValueError(f"behaviour_logprobs: {len(engine_logprobs)} rows for {B} responses, or a row longer "
                         f"than its response; give one (T_i,) tensor per response, as generate() returns them")
    mu = torch.zeros_like(batch.logprobs)  # (B, T) log mu(a_t | s_t), right-padded like the responses
    for i, lp in enumerate(engine_logprobs):
        mu[i, :len(lp)] = lp.to(mu)
    mask = batch.mask
    mu = torch.where(mask.bool(), mu, torch.zeros_like(mu))
    stats = mismatch_stats(batch.logprobs, mu, mask, batch.flipped, comm.all_reduce,
                           lambda x: comm.gather(x.to(mask.device)))
    metrics = {f"rollout/{k}": v.item() for k, v in stats.items()}
    weights = None
    if correction is not None:
        weights, capped = correction(batch.logprobs, mu, mask)
        metrics["rollout/correction_mean"] = masked_mean(weights, mask, all_reduce=comm.all_reduce).item()
        metrics["rollout/correction_capped_frac"] = masked_mean(capped.float(), mask, all_reduce=comm.all_reduce
                                                                ).item()
    return replace(batch, engine_logprobs=mu, correction=weights), metrics
