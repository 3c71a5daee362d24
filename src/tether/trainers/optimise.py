"""Step 6 of a trainer step: ppo_epochs passes of clipped-loss updates over shuffled minibatches, with the
micro-batch accumulation, the joint skips and the optimiser step done through `Ranks` (one process, DDP,
DeepSpeed or FSDP alike). A mixin of `RLTrainer`, kept apart from rollouts and scoring."""

import math

import torch
from torch import Tensor

from tether.distributed import rank_minibatches
from tether.losses.ppo import kl_penalty, policy_loss, value_loss
from tether.ops import gather_logprobs
from tether.trainers.rollouts import Scored


class Optimise:
    """Needs the trainer's config, ranks, device, local sizes, shuffle_generator, scheduler, clip_groups,
    estimator and its `_logits_and_values`, `_replay`, `_sampled_logprobs` and `_kl_logprobs`."""

    def _optimise(self, b: Scored, advantages: Tensor, returns: Tensor | None, beta: float) -> dict[str, float]:
        """6. ppo_epochs passes of shuffled minibatches. An update whose loss or gradient is not finite, or
        whose mean ratio exceeds ratio_threshold, is skipped without touching the weights."""
        c = self.config
        totals: dict[str, float] = {}
        outcomes = {"ok": 0, "fault": 0, "ratio": 0}
        for _ in range(c.ppo_epochs):
            for mb in rank_minibatches(self.local_batch, self.local_minibatch, self.shuffle_generator,
                                       self.ranks.rank, self.ranks.num):
                outcomes[self._update(b, mb.to(self.device), advantages, returns, beta, totals)] += 1
        stats = {k: v / max(outcomes["ok"], 1) for k, v in totals.items()}
        stats["ppo/loss/policy"] = stats.pop("ppo/policy/loss", math.nan)
        stats["ppo/loss/total"] = stats["ppo/loss/policy"]
        if returns is not None:
            stats["ppo/loss/value"] = stats.pop("ppo/val/loss", math.nan)
            stats["ppo/loss/total"] += c.vf_coef * stats["ppo/loss/value"]
        if c.kl_in_loss:
            stats["ppo/loss/kl"] = stats.pop("ppo/kl_loss/loss", math.nan)
            stats["ppo/loss/total"] += beta * stats["ppo/loss/kl"]
        stats["faults/skipped_minibatches"] = float(outcomes["fault"])
        stats["ppo/skipped_ratio_minibatches"] = float(outcomes["ratio"])
        return stats

    def _update(self, b: Scored, mb: Tensor, advantages: Tensor, returns: Tensor | None, beta: float,
                totals: dict) -> str:
        """One optimiser step on minibatch `mb` (this process's rows of it); micro-batches accumulate to the
        global minibatch's token-mean loss exactly: each micro-batch's loss is weighted by its share of the
        minibatch's tokens on all processes (times the process count, which the gradient mean over processes
        divides out). Every skip is decided on all processes together. Returns ok / fault / ratio."""
        c = self.config
        g = self.ranks
        tokens = g.all_reduce(b.mask[mb].sum())
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, Tensor] = {}
        micro = mb.split(self.local_minibatch // c.gradient_accumulation_steps)
        for n, j in enumerate(micro):
            share = b.mask[j].sum() / tokens
            last = n == len(micro) - 1
            with g.no_sync(self.trainable_forward, skip=not last):
                loss, parts = self._micro_loss(b, j, advantages, returns, beta, (share * g.num).item())
                if g.any(not torch.isfinite(loss)):
                    g.discard(loss)
                    return "fault"
                for prefix, st in parts.items():
                    for k, v in st.items():
                        stats[prefix + k] = stats.get(prefix + k, 0.0) + share * v
                if last:  # token-weighted means over the global minibatch, before the last backward
                    names = sorted(stats)
                    summed = g.all_reduce(torch.stack([stats[k].to(self.device, torch.float64) for k in names]))
                    stats = dict(zip(names, summed.tolist()))
                    if stats["ppo/policy/ratio_mean"] > c.ratio_threshold:
                        g.discard(loss)
                        return "ratio"
                g.backward(loss, last)
        norms = g.step(self.clip_groups, c.max_grad_norm)
        if norms is None:
            return "fault"
        self.scheduler.step()
        stats["ppo/grad_norm"] = norms[0].item()
        if len(norms) > 1:
            stats["ppo/critic_grad_norm"] = norms[1].item()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v
        return "ok"

    def _micro_loss(self, b: Scored, j: Tensor, advantages: Tensor, returns: Tensor | None, beta: float,
                    scale: float) -> tuple[Tensor, dict[str, dict[str, Tensor]]]:
        """The loss of micro-batch rows `j`, weighted by `scale`, and its parts' statistics by prefix."""
        c = self.config
        logits, vpred = self._logits_and_values(b.query_ids[j], b.query_mask[j], b.response_ids[j])
        scores = self._replay(logits, b.query_ids[j], b.query_mask[j], b.response_ids[j])
        new_logprobs = self._sampled_logprobs(logits, gather_logprobs(scores, b.response_ids[j]), b.response_ids[j],
                                              b.flipped[j])
        # Nothing below sees padding: after EOS it may replay to -inf (top-k), and exp(inf) * 0 is nan.
        new_logprobs = torch.where(b.mask[j].bool(), new_logprobs, b.logprobs[j])
        loss, parts = policy_loss(new_logprobs, b.logprobs[j], advantages[j], b.mask[j], c.cliprange, scale)
        parts = {"ppo/policy/": parts}
        if returns is not None:
            vf, parts["ppo/val/"] = value_loss(vpred, b.values[j], returns[j], b.mask[j], c.cliprange_value, scale)
            loss = loss + c.vf_coef * vf
        if c.kl_in_loss:
            kl, parts["ppo/kl_loss/"] = kl_penalty(self._kl_logprobs(logits, new_logprobs, b.response_ids[j]),
                                                   b.ref_logprobs[j], b.mask[j], self.estimator.fn, scale)
            loss = loss + beta * kl
        return loss, parts
