"""Step 3, and the log-prob every update recomputes: the policy's log-probs of its sampled tokens under the
sampler's processing replayed on teacher-forced logits (docs/kl.md, "The rule").

`policy_logprobs` is the one function for both: `score_rollouts` calls it once per micro-batch without
gradients (with the reference's logits, so that entropy and the exact KL come from the same log-softmax), and
the update calls it on every micro-batch with gradients."""

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

from tether.models.policy import response_forward
from tether.ops import gather_logprobs
from tether.ops.logprobs import TokenStats, entropy_from_logits, token_stats
from tether.ops.masks import response_mask
from tether.models.policy import response_forward
from tether.rollout import Sampler
from tether.rollout.batch import Rollouts
from tether.trainers.batching import left_pad, right_pad

Forward = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor | None]]  # (q_ids, q_mask, r_ids) -> logits, values


def policy_logprobs(sampler: Sampler, logits: Tensor, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                    flipped: Tensor | None = None, ref_logits: Tensor | None = None, mask: Tensor | None = None,
                    entropy: bool = False) -> tuple[Tensor, Tensor, TokenStats | None, Tensor | None]:
    """log pi(a_t | s_t) (B, T) of the sampled tokens under the replayed processing, with `flipped`; when
    scoring (ref_logits and mask given, no grad), the token statistics of both sides; with `entropy`, the
    entropy (B, T) of the processed sampling distribution at every position, with gradients (entropy_coef).

    A token sampled right at a top-k / top-p boundary can land outside the replayed support by float round-off
    (cached vs teacher-forced forward): scoring finds those (`flipped`) and they are scored untruncated instead of
    -inf, at rollout time and in every update alike, so their ratio starts at 1. score_rollouts refuses a flipped
    token that is more than round-off outside (`outside_support`)."""
    ids = torch.cat([query_ids, response_ids], 1)
    scores = sampler.sequence_scores(logits, ids, torch.cat([query_mask, torch.ones_like(response_ids)], 1))
    stats = None
    if ref_logits is None:
        logprobs = gather_logprobs(scores, response_ids)
    else:
        assert mask is not None, "scoring (ref_logits given) needs the response mask"
        stats = token_stats(scores, sampler.reference_scores(ref_logits), response_ids)  # one log-softmax per side
        logprobs = stats.logprobs
        flipped = ~torch.isfinite(logprobs) & mask.bool()
    if flipped is not None and flipped.any():
        logprobs = torch.where(flipped, gather_logprobs(sampler.reference_scores(logits), response_ids), logprobs)
    return logprobs, flipped, stats, entropy_from_logits(scores) if entropy else None


# How far a replayed raw logit may sit from the one that sampled and still count as round-off: relative to the
# logit, as cached and teacher-forced forward passes (and bf16 autocast) differ by a share of its size.
ROUND_OFF = 1e-2


def outside_support(sampler: Sampler, logits: Tensor, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                    flipped: Tensor) -> Tensor:
    """(B, T) bool: the flipped tokens that are not round-off. A token the replay puts just outside top-k / top-p
    comes back inside when its own logit is nudged up by ROUND_OFF (1 + |logit|); one that stays outside (far from
    the boundary, or banned outright: min_new_tokens, n-gram blocking, a processor's ban) had probability 0 under
    this sampler, so it was not sampled by it."""
    if not flipped.any():
        return flipped
    rows = flipped.any(-1).nonzero().flatten()
    x, tokens = logits[rows].float().clone(), response_ids[rows, :, None]
    picked = x.gather(-1, tokens)
    x.scatter_(-1, tokens, picked + ROUND_OFF * (1 + picked.abs()))
    ids = torch.cat([query_ids[rows], response_ids[rows]], 1)
    nudged = gather_logprobs(sampler.sequence_scores(
        x, ids, torch.cat([query_mask[rows], torch.ones_like(response_ids[rows])], 1)), response_ids[rows])
    out = torch.zeros_like(flipped)
    out[rows] = flipped[rows] & ~torch.isfinite(nudged)
    return out


def kl_logprobs(sampler: Sampler, logits: Tensor, logprobs: Tensor, response_ids: Tensor) -> Tensor:
    """log pi_T(a_t | s_t), the policy at the sampling temperature, untruncated: what the KL term of the loss
    compares with the reference (`losses.ppo.kl_penalty` says why). `logprobs` (the sampling-processed
    log-probs) already are that when the sampler does nothing beyond the temperature."""
    if sampler.only_temperature:
        return logprobs
    return gather_logprobs(sampler.reference_scores(logits), response_ids)


@torch.no_grad()
def score_rollouts(forward: Forward, ref_forward: Callable[[Tensor, Tensor, Tensor], Tensor], sampler: Sampler,
                   estimator, kl_in_loss: bool, queries: list[Tensor], responses: list[Tensor], pad_token_id: int,
                   eos_token_ids: list[int], micro: int, device: torch.device) -> Rollouts:
    """3. Policy log-probs and values, reference log-probs, KL and entropy, `micro` rows at a time (bounded
    memory). forward: the trained module (logits, values); ref_forward: the reference's logits."""
    q_ids, q_mask = (t.to(device) for t in left_pad(queries, pad_token_id))
    r_ids, r_len_mask = (t.to(device) for t in right_pad(responses, pad_token_id))
    mask = response_mask(r_ids, eos_token_ids) * r_len_mask
    parts = []
    for idx in torch.arange(len(queries), device=device).split(micro):
        logits, values = forward(q_ids[idx], q_mask[idx], r_ids[idx])
        ref_logits = ref_forward(q_ids[idx], q_mask[idx], r_ids[idx])
        logprobs, flipped, stats, _ = policy_logprobs(sampler, logits, q_ids[idx], q_mask[idx], r_ids[idx],
                                                   ref_logits=ref_logits, mask=mask[idx])
        outside = outside_support(sampler, logits, q_ids[idx], q_mask[idx], r_ids[idx], flipped)
        if outside.any():  # refused, not relabelled: its ratio and KL would be those of another distribution
            i, t = outside.nonzero()[0].tolist()
            raise ValueError(f"response {idx[i].item()} token {t} (id {r_ids[idx[i], t].item()}) has probability 0 "
                             f"under the sampler (top_k / top_p / min_new_tokens / n-gram blocking / a logits "
                             f"processor), beyond float round-off: it was not sampled with these settings. step() "
                             f"needs responses sampled by generate(), or under the same settings")
        kl = estimator.fn(kl_logprobs(sampler, logits, logprobs, r_ids[idx]) if kl_in_loss else logprobs,
                          stats.ref_logprobs)
        parts.append((logprobs, stats.ref_logprobs, values, kl, stats.kl, stats.entropy, flipped))
    # where, not multiply: after-EOS padding can score -inf under top-k replay, and -inf * 0 is nan
    *tensors, flipped = (torch.cat(p) if p[0] is not None else None for p in zip(*parts))
    logprobs, ref_logprobs, values, kl, kl_exact, entropy = (
        None if t is None else torch.where(mask.bool(), t, 0.0) for t in tensors)
    return Rollouts(q_ids, q_mask, r_ids, mask, logprobs, ref_logprobs, flipped, values, kl, kl_exact, entropy)


def reference_logits(model, peft, q_ids: Tensor, q_mask: Tensor, r_ids: Tensor) -> Tensor:
    """Reference logits (B, T, V): the frozen copy, or with LoRA (`peft`) the policy's LM with its adapters off."""
    with peft.disable_adapter() if peft is not None else nullcontext():
        return response_forward(model, q_ids, q_mask, r_ids)[0]
