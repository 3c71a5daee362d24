"""Reward composition: several rewards, each optionally baselined, normalised and clipped, summed with weights.

Every piece is itself a reward `(prompts, completions, **info) -> list[float]`, so pieces nest and the PPO
trainer sees one callable; each hands on to the reward it wraps the keywords that one takes (an `answer`
column, `ended`, ...). The same composition comes from a YAML spec (`reward: examples/rewards.yaml`):

    components:
      - reward: runs/reward-minilm      # a reward-model folder or package.module:function
        weight: 1.0
        query_baseline: true            # r(q + a) - r(q)
        normalize: true                 # running mean / std across calls
        clip: 3.0                       # to [-3, 3]
      - reward: tether.demo:vader_reward
        weight: 0.5
        name: vader                     # logged as env/reward/vader_mean (default: the function's name)

Per component the order is: baseline -> normalise -> clip -> weight (clip bounds the normalised value,
so `clip: 3` means three running standard deviations, whatever the reward's own scale).
"""

import math
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from tether.rewards.base import RewardError, RewardFn, keyword_names, pass_on, score_batch
from tether.ops.rewards import RunningMoments


class QueryBaseline:
    """r(q + a) - r(q): the reward the completion adds to its prompt (Ziegler et al. 2019 normalise their
    reward model so that prompts alone score 0; this is the per-prompt version of that). It removes what the
    policy cannot change, the prompt's own score, from the signal. r(q) is the reward with an empty
    completion; it is cached per prompt, since prompts repeat across PPO steps."""

    def __init__(self, reward: RewardFn, cache_size: int = 65536) -> None:
        self.reward, self.cache_size = reward, cache_size
        self._names = keyword_names(reward)
        self._cache: OrderedDict[str, float] = OrderedDict()

    def __call__(self, prompts: list[str], completions: list[str], **info) -> list[float]:
        info = pass_on(self._names, info)
        full = score_batch(self.reward, prompts, completions, info)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            # r(q): the empty completion, with its prompt row's columns (that of the prompt's first row)
            first = [prompts.index(p) for p in missing]
            empty = {k: [True if k == "ended" else 0 if k == "completion_tokens" else v[i] for i in first]
                     for k, v in info.items()}
            for p, s in zip(missing, score_batch(self.reward, missing, [""] * len(missing), empty).tolist()):
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
        self._names = keyword_names(reward)
        self.moments = RunningMoments()

    def __call__(self, prompts: list[str], completions: list[str], **info) -> list[float]:
        scores = score_batch(self.reward, prompts, completions, pass_on(self._names, info))
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
        self._names = keyword_names(reward)

    def __call__(self, prompts: list[str], completions: list[str], **info) -> list[float]:
        scores = score_batch(self.reward, prompts, completions, pass_on(self._names, info))
        return scores.clamp(-self.limit, self.limit).tolist()


class WeightedSum:
    """sum_i w_i * r_i(prompts, completions, **info). state_dict() collects the stateful components' states.

    names: one per component, each unique (default: the function's name, or its class's); after each call
    `parts` holds every component's scores (B,) by name, before its weight (after its baseline, normalisation
    and clip), which the trainer logs as env/reward/<name>_mean."""

    def __init__(self, components: list[tuple[RewardFn, float]], names: list[str] | None = None) -> None:
        if not components:
            raise ValueError("WeightedSum needs at least one (reward, weight) component")
        names = list(names) if names is not None else unique_names([default_name(r) for r, _ in components])
        if len(names) != len(components) or len(set(names)) != len(names):
            raise ValueError(f"WeightedSum needs one unique name per component, got {names}")
        self.components, self.names = components, names
        self._keywords = [keyword_names(reward) for reward, _ in components]
        self.parts: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str], completions: list[str], **info) -> list[float]:
        total, parts = torch.zeros(len(completions)), {}
        for i, ((reward, weight), name) in enumerate(zip(self.components, self.names)):
            try:
                parts[name] = score_batch(reward, prompts, completions, pass_on(self._keywords[i], info))
            except (RewardError, ValueError, TypeError) as err:  # plain constructors: safe to re-raise by type
                raise type(err)(f"reward component {i}: {err} (component {i} is named {name!r})") from err
            total += weight * parts[name]
        self.parts = parts
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


def default_name(reward) -> str:
    """A component's name in the metrics: the wrapped function's name (a spec's `a.b:f` -> f), else its class's."""
    while isinstance(reward, (QueryBaseline, RunningNormalize, Clip)):
        reward = reward.reward
    return getattr(reward, "__name__", None) or type(reward).__name__


def unique_names(names: list[str]) -> list[str]:
    """names with a repeated one numbered (f, f_2, f_3)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


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


_COMPONENT_KEYS = {"reward", "weight", "query_baseline", "normalize", "clip", "name"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


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
        name = comp.get("name")
        if name is not None and not (isinstance(name, str) and _NAME.match(name)):
            problems.append(f"{where}: name={name!r} must be letters, digits, _ . or - (it is a metric name)")
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
    components, names = [], []
    for i, comp in enumerate(spec["components"]):
        try:
            reward = resolve(comp["reward"])
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise type(err)(f"reward spec {str(path)!r}, components[{i}]: {err}") from err
        reward = compose(reward, comp.get("query_baseline", False), comp.get("normalize", False), comp.get("clip"))
        components.append((reward, float(comp.get("weight", 1.0))))
        source = comp["reward"]
        names.append(comp.get("name") or (source.rpartition(":")[2] if ":" in source else Path(source).stem))
    given = [c["name"] for c in spec["components"] if c.get("name")]
    if len(set(given)) != len(given):
        raise ValueError(f"invalid reward spec {str(path)!r}: component names {given} repeat")
    return WeightedSum(components, unique_names(names))
