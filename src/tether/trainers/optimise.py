"""Step 6 of a trainer step: ppo_epochs passes of clipped-loss updates over shuffled minibatches of one
`Rollouts` batch, with the micro-batch accumulation, the joint skips and the optimiser step done through `Ranks`
(one process, DDP, DeepSpeed or FSDP alike). Plain functions over the batch and a `Learner`, the parts an update
uses that do not change between steps."""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tether.distributed import Ranks
from tether.partition import rank_minibatches
from tether.losses.ppo import kl_penalty, policy_loss, value_loss
from tether.rollout import Sampler
from tether.rollout.batch import Rollouts
from tether.trainers.scoring import Forward, kl_logprobs, policy_logprobs


@dataclass
class Learner:
    config: object  # PPOConfig
    ranks: Ranks
    forward: Forward  # the trained module (DDP / DeepSpeed / FSDP wrapped, compiled), under autocast
    trained_module: torch.nn.Module  # what `forward` runs, for no_sync
    sampler: Sampler
    estimator: object  # tether.ops.kl.KLEstimator
    optimizer: torch.optim.Optimizer
    scheduler: object
    clip_groups: list[list[Tensor]]  # policy, critic: clipped apart
    local_batch: int
    local_minibatch: int
    device: torch.device
    shuffle_generator: torch.Generator  # minibatch partitions


def optimise(learner: Learner, b: Rollouts, beta: float) -> dict[str, float]:
    """6. ppo_epochs passes of shuffled minibatches. An update whose loss or gradient is not finite, or
    whose mean ratio exceeds ratio_threshold, is skipped without touching the weights."""
    c, g = learner.config, learner.ranks
    totals: dict[str, float] = {}
    outcomes = {"ok": 0, "fault": 0, "ratio": 0}
    for _ in range(c.ppo_epochs):
        for mb in rank_minibatches(learner.local_batch, learner.local_minibatch, learner.shuffle_generator,
                                   g.rank, g.num):
            outcomes[update(learner, b, mb.to(learner.device), beta, totals)] += 1
    stats = {k: v / max(outcomes["ok"], 1) for k, v in totals.items()}
    stats["ppo/loss/policy"] = stats.pop("ppo/policy/loss", math.nan)
    stats["ppo/loss/total"] = stats["ppo/loss/policy"]
    if b.returns is not None:
        stats["ppo/loss/value"] = stats.pop("ppo/val/loss", math.nan)
        stats["ppo/loss/total"] += c.vf_coef * stats["ppo/loss/value"]
    if c.kl_in_loss:
        stats["ppo/loss/kl"] = stats.pop("ppo/kl_loss/loss", math.nan)
        stats["ppo/loss/total"] += beta * stats["ppo/loss/kl"]
    stats["faults/skipped_minibatches"] = float(outcomes["fault"])
    stats["ppo/skipped_ratio_minibatches"] = float(outcomes["ratio"])
    return stats


def update(learner: Learner, b: Rollouts, mb: Tensor, beta: float, totals: dict) -> str:
    """One optimiser step on minibatch `mb` (this process's rows of it); micro-batches accumulate to the
    global minibatch's token-mean loss exactly: each micro-batch's loss is weighted by its share of the
    minibatch's tokens on all processes (times the process count, which the gradient mean over processes
    divides out). Every skip is decided on all processes together. Returns ok / fault / ratio."""
    c, g = learner.config, learner.ranks
    comm = g.comm
    tokens = comm.all_reduce(b.mask[mb].sum())
    learner.optimizer.zero_grad(set_to_none=True)
    stats: dict[str, Tensor] = {}
    micro = mb.split(learner.local_minibatch // c.gradient_accumulation_steps)
    for n, j in enumerate(micro):
        share = b.mask[j].sum() / tokens
        last = n == len(micro) - 1
        with g.no_sync(learner.trained_module, skip=not last):
            loss, parts = micro_loss(learner, b.rows(j), beta, (share * comm.num).item())
            if comm.any(not torch.isfinite(loss)):
                g.discard(loss)
                return "fault"
            for prefix, st in parts.items():
                for k, v in st.items():
                    stats[prefix + k] = stats.get(prefix + k, 0.0) + share * v
            if last:  # token-weighted means over the global minibatch, before the last backward
                names = sorted(stats)
                summed = comm.all_reduce(torch.stack([stats[k].to(learner.device, torch.float64) for k in names]))
                stats = dict(zip(names, summed.tolist()))
                if stats["ppo/policy/ratio_mean"] > c.ratio_threshold:
                    g.discard(loss)
                    return "ratio"
            g.backward(loss, last)
    norms = g.step(learner.clip_groups, c.max_grad_norm)
    if norms is None:
        return "fault"
    learner.scheduler.step()
    stats["ppo/grad_norm"] = norms[0].item()
    if len(norms) > 1:
        stats["ppo/critic_grad_norm"] = norms[1].item()
    for k, v in stats.items():
        totals[k] = totals.get(k, 0.0) + v
    return "ok"


def micro_loss(learner: Learner, mb: Rollouts, beta: float, scale: float) -> tuple[Tensor, dict[str, dict]]:
    """The loss of the micro-batch `mb`, weighted by `scale`, and its parts' statistics by prefix: the clipped
    policy loss (Schulman et al. 2017), the clipped value loss with a critic, and the KL term with kl_in_loss."""
    c, sampler = learner.config, learner.sampler
    logits, vpred = learner.forward(mb.query_ids, mb.query_mask, mb.response_ids)
    new_logprobs, _, _ = policy_logprobs(sampler, logits, mb.query_ids, mb.query_mask, mb.response_ids, mb.flipped)
    # Nothing below sees padding: after EOS it may replay to -inf (top-k), and exp(inf) * 0 is nan.
    new_logprobs = torch.where(mb.mask.bool(), new_logprobs, mb.logprobs)
    loss, parts = policy_loss(new_logprobs, mb.logprobs, mb.advantages, mb.mask, c.cliprange, scale)
    parts = {"ppo/policy/": parts}
    if mb.returns is not None:
        vf, parts["ppo/val/"] = value_loss(vpred, mb.values, mb.returns, mb.mask, c.cliprange_value, scale)
        loss = loss + c.vf_coef * vf
    if c.kl_in_loss:
        kl, parts["ppo/kl_loss/"] = kl_penalty(kl_logprobs(sampler, logits, new_logprobs, mb.response_ids),
                                               mb.ref_logprobs, mb.mask, learner.estimator.fn, scale)
        loss = loss + beta * kl
    return loss, parts
