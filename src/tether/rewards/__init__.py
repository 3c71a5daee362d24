"""Rewards: whatever the config names becomes one checked `(prompts, completions, **info) -> list[float]`.

`base` holds the adapters (scoring a batch, reward models, imported functions), `compose` the combinations a YAML
spec describes; `resolve_reward` picks between them and hands `compose` itself, so neither imports the other."""

from pathlib import Path

import torch

from tether.models.paths import check_model_folder, is_local

from tether.rewards.base import (
    COMPLETION_INFO,
    RewardError,
    RewardFn,
    RewardModel,
    accepted_keywords,
    import_reward,
    score_batch,
)
from tether.rewards.compose import load_reward_spec

__all__ = ["COMPLETION_INFO", "RewardError", "RewardFn", "RewardModel", "accepted_keywords", "import_reward",
           "load_reward_spec", "resolve_reward", "score_batch"]


def resolve_reward(reward, device: torch.device | str = "cpu", batch_size: int = 16) -> RewardFn:
    """A callable as is; `package.module:function` imported; a folder loaded as a reward model; a .yaml/.yml
    file built as a combined reward (weights, query baseline, normalisation, clipping; see rewards.compose)."""
    if callable(reward):
        return _ready(reward)
    if not isinstance(reward, str) or not reward:
        raise ValueError("no reward given: pass a callable, `package.module:function`, a reward-model folder or "
                         "a YAML reward spec")
    if Path(reward).is_dir() or (is_local(reward) and Path(reward).suffix not in (".yaml", ".yml")):
        check_model_folder(reward, "reward", tokenizer=True)  # a reward-model folder: say what it lacks
        return RewardModel(reward, device=device, batch_size=batch_size)
    if Path(reward).suffix in (".yaml", ".yml"):  # its components are resolved as this one is
        return load_reward_spec(reward, lambda component: resolve_reward(component, device, batch_size))
    if ":" not in reward:
        raise ValueError(f"reward {reward!r} is neither `package.module:function` nor an existing folder "
                         f"(nor a .yaml reward spec)")
    return _ready(import_reward(reward))


def _ready(reward: RewardFn) -> RewardFn:
    """A reward with a `check_requirements` attribute (math_answer: its optional package) runs it now, at
    set-up, so a missing package is named before any model loads."""
    check = getattr(reward, "check_requirements", None)
    if callable(check):
        check()
    return reward
