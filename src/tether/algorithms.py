"""The methods tether runs, one entry each in one table: how step 5 turns processed scores and the KL into
per-token advantages, whether a critic is trained, the keys' defaults and the config rules that differ.

Rollouts, masks, the KL, the clipped policy loss, guards, checkpoints and logging are the same code for every
entry (trainers/). `PPOConfig.algorithm` and the `tether <command>` subcommands are read from ALGORITHMS, so
adding a method is one `register(Algorithm(...))` with its advantage function:

    def advantages(batch, scores, kl_coef, config, all_reduce) -> (advantages, returns or None, non_score)

batch: the step's `Rollouts` (kl, mask, values); scores (B,) processed; kl_coef: beta in the reward (0 when the
KL is in the loss); all_reduce: a sum over processes for batch statistics. Returns (B, T) tensors.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tether.ops import gae, group_centred, group_normalised, leave_one_out, masked_whiten
from tether.ops.advantages import batch_scaled
from tether.ops.rewards import shape_rewards
from tether.rollout.batch import Rollouts

Advantages = tuple[Tensor, Tensor | None, Tensor]  # advantages, value targets (None: no critic), non-score reward


@dataclass(frozen=True)
class Algorithm:
    name: str  # PPOConfig.algorithm
    command: str  # `tether <command>`
    help: str  # one line for `tether --help`
    description: str  # the subcommand's --help text
    advantages: Callable[..., Advantages]
    uses_critic: bool = False
    defaults: dict = field(default_factory=dict)  # num_generations, kl_in_loss, whiten_advantages when left unset
    min_generations: int = 1  # completions per prompt it needs (2 for methods that compare them)
    inert: dict[str, str] = field(default_factory=dict)  # keys that do nothing for it -> why (refused when set
    # away from their default)


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add a method to the table (PPOConfig, the CLI and trainer_class read it when used)."""
    missing = {"num_generations", "kl_in_loss", "whiten_advantages"} - set(algorithm.defaults)
    if missing:
        raise ValueError(f"algorithm {algorithm.name!r}: defaults must give {sorted(missing)}")
    taken = {a.command for a in ALGORITHMS.values()} | {"demo", "report", "reward", "inspect-reward"}
    if algorithm.name in ALGORITHMS or algorithm.command in taken:
        raise ValueError(f"algorithm {algorithm.name!r} (command {algorithm.command!r}): the name or the command is "
                         f"taken; in use: {sorted(ALGORITHMS)}, commands {sorted(taken)}")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def ppo_advantages(batch: Rollouts, scores: Tensor, kl_coef: float, c, all_reduce) -> Advantages:
    """PPO as in Ziegler et al. 2019: the KL in the per-token reward, GAE (Schulman et al. 2016) on the critic's
    values; the critic regresses on the GAE returns."""
    rewards, non_score = shape_rewards(scores, batch.kl, batch.mask, kl_coef)
    if c.whiten_rewards:
        rewards = masked_whiten(rewards, batch.mask, shift_mean=False, all_reduce=all_reduce)
    advantages, returns = gae(rewards, batch.values, batch.mask, c.gamma, c.lam)
    return advantages, returns, non_score


def sequence_advantages(batch: Rollouts, scores: Tensor, kl_coef: float, baseline) -> Advantages:
    """For the group estimators (grpo, rloo): sequence reward = score - kl_coef * sum_t KL_t, `baseline` maps
    the (B,) rewards to (B,) advantages, and each completion's advantage goes on every one of its tokens."""
    non_score = -kl_coef * batch.kl * batch.mask
    advantages = baseline(scores + non_score.sum(-1))
    return advantages[:, None] * batch.mask, None, non_score


# scale_rewards: (rewards (B,), G, all_reduce) -> advantages (B,)
GROUP_SCALINGS = {
    "group": lambda r, G, all_reduce: group_normalised(r, G),  # the GRPO paper
    "batch": batch_scaled,  # TRL's scale_rewards="batch" (Hu et al. 2025, REINFORCE++'s global std)
    "none": lambda r, G, all_reduce: group_centred(r, G),  # Dr. GRPO (Liu et al. 2025): no std division
}


def grpo_advantages(batch: Rollouts, scores: Tensor, kl_coef: float, c, all_reduce) -> Advantages:
    """GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1): the reward minus its prompt's group mean, divided by the
    group's std (or as scale_rewards says)."""
    scale = GROUP_SCALINGS[c.scale_rewards]
    return sequence_advantages(batch, scores, kl_coef, lambda r: scale(r, c.num_generations, all_reduce))


def rloo_advantages(batch: Rollouts, scores: Tensor, kl_coef: float, c, all_reduce) -> Advantages:
    """RLOO (Ahmadian et al. 2024; TRL's variant): the reward minus the mean of the prompt's other completions."""
    return sequence_advantages(batch, scores, kl_coef, lambda r: leave_one_out(r, c.num_generations))


def reinforce_pp_advantages(batch: Rollouts, scores: Tensor, kl_coef: float, c, all_reduce) -> Advantages:
    """REINFORCE++ (Hu 2025; OpenRLHF's variant): the per-token reward (score at the last token, -beta * KL on
    every token) summed into discounted returns-to-go, whitened over the batch by whiten_advantages. With
    num_generations > 1 each score first loses its prompt's mean (the "baseline" variant)."""
    if c.num_generations > 1:
        scores = group_centred(scores, c.num_generations)
    rewards, non_score = shape_rewards(scores, batch.kl, batch.mask, kl_coef)
    if c.whiten_rewards:
        rewards = masked_whiten(rewards, batch.mask, shift_mean=False, all_reduce=all_reduce)
    # GAE with V = 0 and lambda = 1 is exactly the discounted return-to-go: one copy of the recursion.
    returns_to_go, _ = gae(rewards, torch.zeros_like(rewards), batch.mask, c.gamma, 1.0)
    return returns_to_go, None, non_score


_SCALE = {"scale_rewards": "scale_rewards is grpo's group baseline"}
_PER_TOKEN = {k: "its advantage is one number per completion" for k in ("whiten_rewards", "gamma", "lam")}
register(Algorithm(
    "ppo", "ppo", "PPO on your model, prompts and reward", "Train a causal LM with PPO against a reward.",
    ppo_advantages, uses_critic=True,
    defaults={"num_generations": 1, "kl_in_loss": False, "whiten_advantages": True}, inert=_SCALE))
register(Algorithm(
    "grpo", "grpo", "GRPO (critic-free)",
    "GRPO: no critic; completions of one prompt are compared within their group (mean/std). Same keys as "
    "`tether ppo`; defaults: num_generations 4, KL in the loss (k3).", grpo_advantages,
    defaults={"num_generations": 4, "kl_in_loss": True, "whiten_advantages": False}, min_generations=2,
    inert=_PER_TOKEN))
register(Algorithm(
    "rloo", "rloo", "RLOO (critic-free)",
    "RLOO: no critic; each completion's baseline is the mean reward of its prompt's other completions. Same keys "
    "as `tether ppo`; defaults: num_generations 4, KL in the reward.", rloo_advantages,
    defaults={"num_generations": 4, "kl_in_loss": False, "whiten_advantages": False}, min_generations=2,
    inert=_PER_TOKEN | _SCALE))
register(Algorithm(
    "reinforce++", "reinforce-pp", "REINFORCE++ (critic-free)",
    "REINFORCE++: no critic; per-token returns with the KL in the reward, whitened over the batch. Same keys as "
    "`tether ppo`.", reinforce_pp_advantages,
    defaults={"num_generations": 1, "kl_in_loss": False, "whiten_advantages": True},
    inert={"lam": "returns-to-go, no critic"} | _SCALE))
