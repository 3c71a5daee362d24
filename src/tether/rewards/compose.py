"""Reward composition: several rewards, each optionally baselined, normalised and clipped, summed with weights.

Every piece is itself a reward `(prompts, completions) -> list[float]`, so pieces nest and the PPO trainer
sees one callable. The same composition comes from a YAML spec (`reward: examples/rewards.yaml`):

    components:
      - reward: runs/reward-minilm      # a reward-model folder or package.module:function
        weight: 1.0
        query_baseline: true            # r(q + a) - r(q)
        normalize: true                 # running mean / std across calls
        clip: 3.0                       # to [-3, 3]
      - reward: tether.demo:vader_reward
        weight: 0.5

Per component the order is: baseline -> normalise -> clip -> weight (clip bounds the normalised value,
so `clip: 3` means three running standard deviations, whatever the reward's own scale).
"""

import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from tether.rewards.base import RewardError, RewardFn, score_batch
from tether.ops.rewards import RunningMoments


class QueryBaseline:
    """r(q + a) - r(q): the reward the completion adds to its prompt (Ziegler et al. 2019 normalise their
    reward model so that prompts alone score 0; this is the per-prompt version of that). It removes what the
    policy cannot change, the prompt's own score, from the signal. r(q) is the reward with an empty
    completion; it is cached per prompt, since prompts repeat across PPO steps."""

    def __init__(self, reward: RewardFn, cache_size: int = 65536) -> None:
        self.reward, self.cache_size = reward, cache_size
        self._cache: OrderedDict[str, float] = OrderedDict()

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        full = score_batch(self.reward, prompts, completions)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            for p, s in zip(missing, score_batch(self.reward, missing, [""] * len(missing)).tolist()):
                if math.isfinite(s):  # a nan is passed on (the trainer skips that step), never remembered
                    self._cache[p] = s
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return (full - torch.tensor([self._cache.get(p, math.nan) for p in prompts])).tolist()


class RunningNormalize:
    """(r - running mean) / running std, the statistics updated with each batch before it is normalised
    (as the PPO trainer's score_norm does). Stateful: state_dict() / load_state_dict() let a checkpoint
    carry the statistics, so a resumed run scales rewards as the interrupted one did.

    On several processes (each scoring its own rows, every one calling this together) the statistics are
    updated with every process's scores, so all processes normalise alike, as one process would."""

    def __init__(self, reward: RewardFn, eps: float = 1e-8) -> None:
        self.reward, self.eps = reward, eps
        self.moments = RunningMoments()

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        scores = score_batch(self.reward, prompts, completions)
        # Only finite scores update the statistics: score_batch passes nan/inf on (the PPO trainer skips
        # that step), and one of them in the moments would turn every later score into nan.
        self.moments.update(torch.tensor(_every_process(scores[torch.isfinite(scores)].tolist())))
        return ((scores - self.moments.mean) / max(self.moments.std, self.eps)).tolist()

    def state_dict(self) -> dict:
        return self.moments.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.moments.load_state_dict(state)


def _every_process(values: list[float]) -> list[float]:
    """Every process's values in rank order when a process group is running; else `values`."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    from tether.collectives import gather_lists

    return gather_lists(values)


class Clip:
    """Scores clipped to [-limit, limit]: one absurd score cannot dominate a batch's advantages."""

    def __init__(self, reward: RewardFn, limit: float) -> None:
        if not limit > 0:
            raise ValueError(f"clip limit must be > 0, got {limit!r}")
        self.reward, self.limit = reward, limit

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return score_batch(self.reward, prompts, completions).clamp(-self.limit, self.limit).tolist()


class WeightedSum:
    """sum_i w_i * r_i(prompts, completions). state_dict() collects the stateful components' states."""

    def __init__(self, components: list[tuple[RewardFn, float]]) -> None:
        if not components:
            raise ValueError("WeightedSum needs at least one (reward, weight) component")
        self.components = components

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        total = torch.zeros(len(completions))
        for i, (reward, weight) in enumerate(self.components):
            try:
                total += weight * score_batch(reward, prompts, completions)
            except (RewardError, ValueError, TypeError) as err:  # plain constructors: safe to re-raise by type
                raise type(err)(f"reward component {i}: {err}") from err
        return total.tolist()

    def state_dict(self) -> dict:
        return {str(i): _state(reward) for i, (reward, _) in enumerate(self.components) if _state(reward)}

    def load_state_dict(self, state: dict) -> None:
        for i, (reward, _) in enumerate(self.components):
            if str(i) in state:
                _load_state(reward, state[str(i)])


def _state(reward) -> dict:
    """The state of a reward and of the rewards it wraps (nested under 'inner')."""
    state = reward.state_dict() if isinstance(reward, (RunningNormalize, WeightedSum)) else {}
    inner = getattr(reward, "reward", None)
    inner_state = _state(inner) if inner is not None else {}
    return {**state, "inner": inner_state} if inner_state else state


def _load_state(reward, state: dict) -> None:
    if isinstance(reward, (RunningNormalize, WeightedSum)):
        reward.load_state_dict({k: v for k, v in state.items() if k != "inner"})
    if "inner" in state:
        _load_state(reward.reward, state["inner"])


def compose(reward: RewardFn, query_baseline: bool = False, normalize: bool = False,
            clip: float | None = None) -> RewardFn:
    """Wrap one reward in the optional stages, in the documented order."""
    if query_baseline:
        reward = QueryBaseline(reward)
    if normalize:
        reward = RunningNormalize(reward)
    if clip is not None:
        reward = Clip(reward, clip)
    return reward


_COMPONENT_KEYS = {"reward", "weight", "query_baseline", "normalize", "clip"}


def spec_errors(spec) -> list[str]:
    """Every problem in a parsed YAML spec, each naming the component and key."""
    if not isinstance(spec, dict) or "components" not in spec:
        return ["expected a mapping with a `components` list"]
    problems = [f"unknown top-level key {k!r} (only `components`)" for k in spec if k != "components"]
    components = spec["components"]
    if not isinstance(components, list) or not components:
        return problems + ["`components` must be a non-empty list"]
    for i, comp in enumerate(components):
        where = f"components[{i}]"
        if not isinstance(comp, dict):
            problems.append(f"{where}: expected a mapping with `reward` (and weight, query_baseline, ...)")
            continue
        problems += [f"{where}: unknown key {k!r} (known: {sorted(_COMPONENT_KEYS)})" for k in comp
                     if k not in _COMPONENT_KEYS]
        if not isinstance(comp.get("reward"), str) or not comp.get("reward"):
            problems.append(f"{where}: `reward` must be a reward-model folder or `package.module:function`")
        weight = comp.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            problems.append(f"{where}: weight={weight!r} must be a number")
        for key in ("query_baseline", "normalize"):
            if not isinstance(comp.get(key, False), bool):
                problems.append(f"{where}: {key}={comp[key]!r} must be true or false")
        clip = comp.get("clip")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            problems.append(f"{where}: clip={clip!r} must be a number > 0 (or left out)")
    return problems


def load_reward_spec(path: str | Path, resolve: Callable[[str], RewardFn]) -> WeightedSum:
    """Build the combined reward a YAML spec describes. resolve: turns each component's `reward` string into
    a reward, like PPOConfig.reward (`tether.rewards.resolve_reward` with the device and batch size bound;
    paths relative to the current folder, as every other path in a tether config)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward spec {str(path)!r} does not exist")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"reward spec {str(path)!r} is not valid YAML: {err}") from None
    problems = spec_errors(spec)
    if problems:
        raise ValueError(f"invalid reward spec {str(path)!r}:\n  - " + "\n  - ".join(problems))
    components = []
    for i, comp in enumerate(spec["components"]):
        try:
            reward = resolve(comp["reward"])
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise type(err)(f"reward spec {str(path)!r}, components[{i}]: {err}") from err
        reward = compose(reward, comp.get("query_baseline", False), comp.get("normalize", False), comp.get("clip"))
        components.append((reward, float(comp.get("weight", 1.0))))
    return WeightedSum(components)
