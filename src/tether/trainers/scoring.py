"""Step 3, and the log-prob every update recomputes: the policy's log-probs of its sampled tokens under the
sampler's processing replayed on teacher-forced logits (docs/kl.md, "The rule").

`TokenReplay` is the one per-token function for both. The trained module's forward runs it over blocks of
positions (`tether.models.head.over_positions`), so the logits of at most one block exist at a time:
`score_rollouts` runs it once per micro-batch without gradients, with the reference's hidden states and head
(entropy and the exact KL then come from the same log-softmax), and the update runs it on every micro-batch with
gradients."""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tether.models.policy import response_states
from tether.ops import gather_logprobs
from tether.ops.logprobs import entropy_from_logits, token_stats
from tether.ops.masks import padding_bounds, response_mask
from tether.rollout import Sampler
from tether.rollout.batch import Rollouts
from tether.trainers.batching import left_pad, length_order, right_pad

# (q_ids, q_mask, r_ids, per_token) -> per_token's results (B, T) by name, values (B, T) or None
Forward = Callable[..., tuple[dict[str, Tensor], Tensor | None]]
# (q_ids, q_mask, r_ids) -> the reference's states and the projection of a block of them onto the vocabulary
RefForward = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Callable[[Tensor], Tensor]]]


@dataclass
class TokenReplay:
    """Per block of positions (`over_positions`): log pi(a_t | s_t) of the sampled tokens under the replayed
    processing (`logprobs`); with `kl`, log pi_T(a_t | s_t) at the sampling temperature, untruncated
    (`kl_logprobs`: what the KL term of the loss compares with the reference, `losses.ppo.kl_penalty` says why);
    with `entropy`, the entropy of the processed sampling distribution, with gradients (entropy_coef).
    When scoring (`ref` given, no gradients): also the reference's log-probs, the exact KL and the entropy from
    one log-softmax per side (`token_stats`), the support flips and those beyond round-off (`outside`).

    A token sampled right at a top-k / top-p boundary can land outside the replayed support by float round-off
    (cached vs teacher-forced forward): scoring finds those (`flipped`) and they are scored untruncated instead of
    -inf, at rollout time and in every update alike, so their ratio starts at 1. score_rollouts refuses a flipped
    token that is more than round-off outside (`outside_support`)."""

    sampler: Sampler
    query_ids: Tensor  # (B, P)
    query_mask: Tensor  # (B, P)
    response_ids: Tensor  # (B, T)
    flipped: Tensor | None = None  # (B, T) bool, from scoring; None when scoring
    kl: bool = False
    entropy: bool = False
    ref: tuple[Tensor, Callable[[Tensor], Tensor]] | None = None  # scoring: the reference's states and projection
    mask: Tensor | None = None  # (B, T) the response mask, when scoring

    def __post_init__(self) -> None:
        self.ids = torch.cat([self.query_ids, self.response_ids], 1)
        self.attention = torch.cat([self.query_mask, torch.ones_like(self.response_ids)], 1)

    def __call__(self, logits: Tensor, b: slice, t: slice) -> dict[str, Tensor]:
        s, tokens, end = self.sampler, self.response_ids[b, t], self.query_ids.shape[1] + t.stop
        ids, attention = self.ids[b, :end], self.attention[b, :end]
        scores = s.sequence_scores(logits, ids, attention, start=t.start)
        out = {}
        if self.ref is None:
            logprobs = gather_logprobs(scores, tokens)
            flipped = None if self.flipped is None else self.flipped[b, t]
        else:
            assert self.mask is not None, "scoring (ref given) needs the response mask"
            states, project = self.ref
            stats = token_stats(scores, s.reference_scores(project(states[b, t])), tokens)  # one log-softmax a side
            logprobs = stats.logprobs
            flipped = ~torch.isfinite(logprobs) & self.mask[b, t].bool()
            out = {"ref_logprobs": stats.ref_logprobs, "kl_exact": stats.kl, "entropy": stats.entropy,
                   "flipped": flipped, "outside": outside_support(s, logits, ids, attention, tokens, flipped, t.start)}
        any_flipped = flipped is not None and bool(flipped.any())
        untruncated = (gather_logprobs(s.reference_scores(logits), tokens)
                       if any_flipped or (self.kl and not s.only_temperature) else None)
        if any_flipped:
            logprobs = torch.where(flipped, untruncated, logprobs)
        out["logprobs"] = logprobs
        if self.kl:  # at the temperature alone the sampling scores already are pi_T
            out["kl_logprobs"] = logprobs if s.only_temperature else untruncated
        if self.entropy and self.ref is None:
            out["entropy"] = entropy_from_logits(scores)
        return out


# How far a replayed raw logit may sit from the one that sampled and still count as round-off: relative to the
# logit, as cached and teacher-forced forward passes (and bf16 autocast) differ by a share of its size.
ROUND_OFF = 1e-2


def outside_support(sampler: Sampler, logits: Tensor, ids: Tensor, attention: Tensor, tokens: Tensor,
                    flipped: Tensor, start: int = 0) -> Tensor:
    """(b, t) bool: the flipped tokens that are not round-off. logits (b, t, V): a block of positions from `start`;
    ids, attention: prompt + response up to its last token (as for `Sampler.sequence_scores`). A token the replay
    puts just outside top-k / top-p comes back inside when its own logit is nudged up by ROUND_OFF (1 + |logit|);
    one that stays outside (far from the boundary, or banned outright: min_new_tokens, n-gram blocking, a
    processor's ban) had probability 0 under this sampler, so it was not sampled by it."""
    if not flipped.any():
        return flipped
    rows = flipped.any(-1).nonzero().flatten()
    x, picked_ids = logits[rows].float().clone(), tokens[rows, :, None]
    picked = x.gather(-1, picked_ids)
    x.scatter_(-1, picked_ids, picked + ROUND_OFF * (1 + picked.abs()))
    nudged = gather_logprobs(sampler.sequence_scores(x, ids[rows], attention[rows], start), tokens[rows])
    out = torch.zeros_like(flipped)
    out[rows] = flipped[rows] & ~torch.isfinite(nudged)
    return out


@torch.no_grad()
def score_rollouts(forward: Forward, ref_forward: RefForward, sampler: Sampler, estimator, kl_in_loss: bool,
                   queries: list[Tensor], responses: list[Tensor], pad_token_id: int, eos_token_ids: list[int],
                   micro: int, device: torch.device) -> Rollouts:
    """3. Policy log-probs and values, reference log-probs, KL and entropy, `micro` rows at a time and within them
    a block of positions at a time (bounded memory). forward: the trained module; ref_forward: the reference's
    states and head (`reference_states`)."""
    q_ids, q_mask = (t.to(device) for t in left_pad(queries, pad_token_id))
    r_ids, r_len_mask = (t.to(device) for t in right_pad(responses, pad_token_id))
    mask = response_mask(r_ids, eos_token_ids) * r_len_mask
    found: dict[str, Tensor] = {}  # (B, T) each, filled a micro-batch at a time; 0 on padding
    # micro-batches of rows of like length, each cut to its own longest prompt and response
    for idx in length_order(q_mask, mask).split(micro):
        p0, t1 = padding_bounds(q_mask[idx], mask[idx])
        q, m, r = q_ids[idx, p0:], q_mask[idx, p0:], r_ids[idx, :t1]
        replay = TokenReplay(sampler, q, m, r, kl=kl_in_loss, ref=ref_forward(q, m, r), mask=mask[idx, :t1])
        out, values = forward(q, m, r, replay)
        if out["outside"].any():  # refused, not relabelled: its ratio and KL would be those of another distribution
            i, t = out["outside"].nonzero()[0].tolist()
            raise ValueError(f"response {idx[i].item()} token {t} (id {r[i, t].item()}) has probability 0 "
                             f"under the sampler (top_k / top_p / min_new_tokens / n-gram blocking / a logits "
                             f"processor), beyond float round-off: it was not sampled with these settings. step() "
                             f"needs responses sampled by generate(), or under the same settings")
        out["kl"] = estimator.fn(out["kl_logprobs"] if kl_in_loss else out["logprobs"], out["ref_logprobs"])
        if values is not None:
            out["values"] = values
        for name in ("logprobs", "ref_logprobs", "values", "kl", "kl_exact", "entropy", "flipped"):
            if name in out:
                if name not in found:
                    found[name] = torch.zeros(mask.shape, dtype=out[name].dtype, device=device)
                found[name][idx, :t1] = out[name]
    # where, not multiply: after-EOS padding can score -inf under top-k replay, and -inf * 0 is nan
    logprobs, ref_logprobs, values, kl, kl_exact, entropy = (
        torch.where(mask.bool(), found[k], 0.0) if k in found else None
        for k in ("logprobs", "ref_logprobs", "values", "kl", "kl_exact", "entropy"))
    return Rollouts(q_ids, q_mask, r_ids, mask, logprobs, ref_logprobs, found["flipped"], values, kl, kl_exact,
                    entropy)


def reference_states(model, head: nn.Module | None, peft, q_ids: Tensor, q_mask: Tensor, r_ids: Tensor
                     ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The reference's states and projection (`response_states`): the frozen copy, or with LoRA (`peft`) the
    policy's LM with its adapters off, in the forward and in the projection alike."""
    with peft.disable_adapter() if peft is not None else nullcontext():
        states, _, project = response_states(model, head, q_ids, q_mask, r_ids)
    if peft is None:
        return states, project

    def without_adapters(x: Tensor) -> Tensor:
        with peft.disable_adapter():
            return project(x)
    return states, without_adapters
