"""Step 6 of a trainer step: ppo_epochs passes of clipped-loss updates over shuffled minibatches of one
`Rollouts` batch, with the micro-batch accumulation, the joint skips and the optimiser step done through `Ranks`
(one process, DDP, DeepSpeed or FSDP alike). Plain functions over the batch and a `Learner`, the parts an update
uses that do not change between steps."""

import math
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from tether.distributed import Ranks
from tether.losses.aggregation import AGGREGATIONS
from tether.losses.ppo import OBJECTIVES, RATIOS, entropy_bonus, kl_penalty, policy_loss, value_loss
from tether.partition import rank_minibatches
from tether.rollout import Sampler
from tether.rollout.batch import Rollouts
from tether.trainers.batching import length_order
from tether.trainers.scoring import Forward, TokenReplay


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
    # the loss's variants, chosen once from the config (docs/algorithms.md, "The loss menu")
    policy_loss: object = field(init=False)  # policy_loss with its ratio, objective and clip bounds bound
    aggregate: object = field(init=False)  # (loss mask, all_reduce) -> per-token weights

    def __post_init__(self) -> None:
        c = self.config
        self.policy_loss = partial(policy_loss, cliprange=c.cliprange_low, cliprange_high=c.cliprange_high,
                                   dual_clip=c.dual_clip, ratio=RATIOS[c.importance_ratio],
                                   objective=OBJECTIVES[c.policy_loss])
        constant = c.loss_norm_constant or c.max_new_tokens
        self.aggregate = partial(lambda rule, mask, all_reduce: rule(mask, all_reduce, constant),
                                 AGGREGATIONS[c.loss_aggregation])


def optimise(learner: Learner, b: Rollouts, beta: float) -> dict[str, float]:
    """6. ppo_epochs passes of shuffled minibatches. An update whose loss or gradient is not finite, or
    whose mean ratio exceeds ratio_threshold, is skipped without touching the weights."""
    c, g = learner.config, learner.ranks
    totals: dict[str, float] = {}
    outcomes = {"ok": 0, "fault": 0, "ratio": 0, "empty": 0}
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
    if c.entropy_coef > 0:
        stats["ppo/loss/entropy"] = stats.pop("ppo/entropy_loss/loss", math.nan)
        stats["ppo/loss/total"] += c.entropy_coef * stats["ppo/loss/entropy"]
    if "padding/slots" in stats:  # shares of the positions the updates' forward passes ran on
        slots, real, whole = (stats.pop(f"padding/{k}") for k in ("slots", "real", "batch_padded"))
        stats["throughput/padding_share"] = 1 - real / slots
        stats["throughput/padding_share_batch_padded"] = 1 - real / whole
    stats["faults/skipped_minibatches"] = float(outcomes["fault"])
    stats["ppo/skipped_ratio_minibatches"] = float(outcomes["ratio"])
    stats["ppo/empty_minibatches"] = float(outcomes["empty"])
    return stats


def update(learner: Learner, b: Rollouts, mb: Tensor, beta: float, totals: dict) -> str:
    """One optimiser step on minibatch `mb` (this process's rows of it). The loss aggregation's per-token weights
    are normalised over the global minibatch first, so the micro-batches' losses add up to the minibatch's loss
    exactly (each backward is of the loss times the process count, which the gradient mean over processes
    divides out); the statistics are token means over the minibatch's loss tokens the same way. Every skip is
    decided on all processes together.
    Returns ok / fault / ratio, or empty for a minibatch with no loss token (every row left out of the loss)."""
    c, g = learner.config, learner.ranks
    comm = g.comm
    mb = mb[length_order(b.query_mask[mb], b.mask[mb])]  # micro-batches of rows of like length: less padding
    loss_mask = b.train_mask[mb]
    if comm.all_reduce(loss_mask.sum()) == 0:
        return "empty"
    size = learner.local_minibatch // c.gradient_accumulation_steps
    weights = learner.aggregate(loss_mask, comm.all_reduce).split(size)
    stat_weights = (loss_mask / comm.all_reduce(loss_mask.sum())).split(size)
    learner.optimizer.zero_grad(set_to_none=True)
    stats: dict[str, Tensor] = {}
    micro = mb.split(size)
    for n, j in enumerate(micro):
        last = n == len(micro) - 1
        with g.no_sync(learner.trained_module, skip=not last):
            part = b.rows(j).trimmed()  # to its own longest prompt and response
            t1 = part.mask.shape[1]
            loss, parts = micro_loss(learner, part, beta, weights[n][:, :t1], stat_weights[n][:, :t1])
            parts["padding/"] = padding_counts(part, b)
            if comm.any(not torch.isfinite(loss)):
                g.discard(loss)
                return "fault"
            for prefix, st in parts.items():
                for k, v in st.items():
                    stats[prefix + k] = stats.get(prefix + k, 0.0) + v
            if last:  # sums over the global minibatch, before the last backward
                names = sorted(stats)
                summed = comm.all_reduce(torch.stack([stats[k].to(learner.device, torch.float64) for k in names]))
                stats = dict(zip(names, summed.tolist()))
                if stats["ppo/policy/ratio_mean"] > c.ratio_threshold:
                    g.discard(loss)
                    return "ratio"
            g.backward(loss * comm.num, last)  # the gradient mean over processes divides by num
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


def padding_counts(part: Rollouts, batch: Rollouts) -> dict[str, Tensor]:
    """Positions a micro-batch's forward pass runs on (`slots`), the real tokens among them (prompt tokens and
    response tokens up to EOS), and the slots it would take padded like the whole batch (`batch_padded`)."""
    rows = len(part.mask)
    return {"slots": torch.tensor(float(part.query_ids.numel() + part.response_ids.numel())),
            "real": (part.query_mask.sum() + part.mask.sum()).double(),
            "batch_padded": torch.tensor(float(rows * (batch.query_ids.shape[1] + batch.response_ids.shape[1])))}


def micro_loss(learner: Learner, mb: Rollouts, beta: float, weights: Tensor, stat_weights: Tensor
               ) -> tuple[Tensor, dict[str, dict]]:
    """The loss of the micro-batch `mb`, sum(weights * per-token loss), and its parts' statistics by prefix (each
    a share of the minibatch's value: they add up over micro-batches and processes): the policy loss as
    configured (clipped surrogate or CISPO, token or sequence ratio), the clipped value loss with a critic, the KL
    term with kl_in_loss, and the entropy bonus with entropy_coef."""
    c = learner.config
    replay = TokenReplay(learner.sampler, mb.query_ids, mb.query_mask, mb.response_ids, mb.flipped, kl=c.kl_in_loss,
                         entropy=c.entropy_coef > 0)
    out, vpred = learner.forward(mb.query_ids, mb.query_mask, mb.response_ids, replay)
    # Nothing below sees padding: after EOS it may replay to -inf (top-k), and exp(inf) * 0 is nan.
    new_logprobs = torch.where(mb.mask.bool(), out["logprobs"], mb.logprobs)
    mask = mb.train_mask
    # rollout correction: the engine's importance weights scale the policy term only (trainers/behaviour.py)
    loss, parts = learner.policy_loss(new_logprobs, mb.logprobs, mb.advantages, mask, stat_weights=stat_weights,
                                      weights=weights if mb.correction is None else weights * mb.correction)
    parts = {"ppo/policy/": parts}
    if mb.returns is not None:
        vf, parts["ppo/val/"] = value_loss(vpred, mb.values, mb.returns, mask, c.cliprange_value, weights=weights,
                                           stat_weights=stat_weights)
        loss = loss + c.vf_coef * vf
    if c.kl_in_loss:
        kl_logprobs = torch.where(mb.mask.bool(), out["kl_logprobs"], mb.logprobs)
        kl, parts["ppo/kl_loss/"] = kl_penalty(kl_logprobs, mb.ref_logprobs, mask, learner.estimator.fn,
                                               weights=weights)
        loss = loss + beta * kl
    if "entropy" in out:
        bonus, parts["ppo/entropy_loss/"] = entropy_bonus(out["entropy"], mask, weights=weights)
        loss = loss + c.entropy_coef * bonus
    return loss, parts
