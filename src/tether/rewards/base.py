"""Reward adapters: everything becomes `(prompts, completions, **info) -> list[float]`, checked on return.

`info` is what tether knows about each completion (COMPLETION_INFO) and the other columns of its prompt row (an
`answer`, a `task`, ...); a reward receives the keys its signature names (all of them with `**kwargs`), read once
at set-up by `accepted_keywords`, so plain `(prompts, completions)` callables keep working."""

import importlib
import inspect
import numbers
import os
import sys
from collections.abc import Callable, Sequence

import torch

from tether.models.policy import context_length

RewardFn = Callable[..., Sequence[float]]  # (prompts, completions, **info) -> one number per completion

# What a reward may ask for about each completion, by keyword (lists in completion order).
COMPLETION_INFO = {
    "ended": "bool: the completion ended with EOS (False: it was cut at max_new_tokens)",
    "completion_tokens": "int: its sampled tokens, the EOS included",
}


class RewardError(RuntimeError):
    """The user's reward function raised; the message names the batch, the cause is chained."""


def import_reward(reward: str) -> RewardFn:
    """The function a `package.module:function` string names, imported (the current folder on sys.path)."""
    module_name, _, attr = reward.partition(":")
    if os.getcwd() not in sys.path:  # the `tether` script's sys.path starts at its bin/, not at the user's folder
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward {reward!r}: cannot import {attr!r} from module {module_name!r}: {err}") from err
    if not callable(fn):
        raise TypeError(f"reward {reward!r} is a {type(fn).__name__}, not a function")
    return fn


def keyword_names(reward: RewardFn) -> frozenset[str] | None:
    """The keywords `reward` takes besides (prompts, completions): those its signature names, None with **kwargs
    (it takes any). A builtin or C callable without a signature: none."""
    try:
        params = inspect.signature(reward).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(k for k, p in params.items() if p.kind in named)


def accepted_keywords(reward: RewardFn, available=tuple(COMPLETION_INFO)) -> tuple[str, ...]:
    """The keywords of `available` that `reward` takes: those its signature names, or all with **kwargs.
    available: what tether knows about each completion (COMPLETION_INFO) and the prompt rows' other columns."""
    names = keyword_names(reward)
    return tuple(available) if names is None else tuple(k for k in available if k in names)


def pass_on(names: frozenset[str] | None, info: dict) -> dict:
    """The entries of `info` a reward whose keyword_names are `names` takes (wrappers hand on what they got)."""
    return dict(info) if names is None else {k: v for k, v in info.items() if k in names}


def score_batch(reward: RewardFn, prompts: list[str], completions: list[str], info: dict | None = None) -> torch.Tensor:
    """Call the reward and check what comes back: one number per completion. info: keyword arguments, one list
    entry per completion (only those the reward accepts; see accepted_keywords). nan/inf are passed on: the
    trainer skips that step's update and stops after max_faults_in_row such steps in a row."""
    info = info or {}
    try:
        scores = reward(prompts, completions, **info)
    except Exception as err:
        i = _first_failing(reward, prompts, completions, info)
        where = (f"on completion {i}. Prompt: {prompts[i]!r} Completion: {completions[i]!r}" if i is not None
                 else f"on the batch of {len(prompts)} (each completion alone scores fine)")
        raise RewardError(f"the reward function raised {type(err).__name__}: {err} {where}") from err
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().reshape(-1).tolist()
    try:
        scores = list(scores)
    except TypeError:
        raise TypeError(f"the reward must return a list of numbers, got {type(scores).__name__}") from None
    if len(scores) != len(completions):
        raise ValueError(f"the reward returned {len(scores)} scores for {len(completions)} completions")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise TypeError(f"the reward returned {s!r} ({type(s).__name__}) for completion {i}; expected a number."
                            f" Prompt: {prompts[i]!r} Completion: {completions[i]!r}")
    return torch.tensor([float(s) for s in scores])


def _first_failing(reward: RewardFn, prompts: list[str], completions: list[str], info: dict) -> int | None:
    """After a batch failed: call the reward one pair at a time to name the pair that breaks it."""
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        try:
            reward([prompt], [completion], **{k: v[i:i + 1] for k, v in info.items()})
        except Exception:
            return i
    return None


class RewardModel:
    """A sequence-classification model with one output (num_labels=1) and its own tokenizer, scoring the
    text prompt + completion. The policy's token ids are never passed here: PPO hands over decoded text,
    which this class re-tokenises with the reward model's tokenizer and scores in padded batches of
    `batch_size`, so the two tokenizers (and vocabularies) may differ freely. Long texts are cut from the
    left, so the completion is never the part that is dropped.

    `RewardModel(path)` loads a folder; `RewardModel(model=..., tokenizer=...)` wraps objects in memory."""

    def __init__(self, path: str | None = None, device: torch.device | str = "cpu", batch_size: int = 16, *,
                 model=None, tokenizer=None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if (path is None) == (model is None and tokenizer is None):
            raise ValueError("RewardModel takes a folder path, or a model and its tokenizer, not both")
        if path is None and (model is None or tokenizer is None):
            raise ValueError("RewardModel(model=..., tokenizer=...) needs both the model and its tokenizer")
        name = path if path is not None else type(model).__name__
        self.tokenizer = AutoTokenizer.from_pretrained(path) if tokenizer is None else tokenizer
        self.tokenizer.truncation_side = "left"
        # Right padding: with left padding a model without explicit position ids (GPT-2's sequence
        # classifier, BERT) shifts every position of a short row, so a text's score would depend on its batch.
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = (AutoModelForSequenceClassification.from_pretrained(path) if model is None else model)
        self.model = self.model.to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {name!r} has {self.model.config.num_labels} outputs; tether needs a "
                             f"scalar reward model (num_labels=1), e.g. one trained with a pairwise loss")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size = device, batch_size
        limits = [n for n in (context_length(self.model.config), self.tokenizer.model_max_length) if n and n < 10**9]
        self.max_length = min(limits) if limits else None

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return self.score_texts([p + c for p, c in zip(prompts, completions)])

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        """r(text) for whole texts, in padded batches of batch_size."""
        scores = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=self.max_length is not None, max_length=self.max_length)
            logits = self.model(**enc.to(self.device)).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores
