"""Rollout engines: who samples the completions of step 1. One entry per `rollout_engine`, chosen once when the
trainer is built; each is a callable `engine(queries) -> Sampled` with a `weights_changed()` the trainer calls
after every update (and after a resume), so that the next generation samples from the weights just trained.

- tether: tether's own decoding loop (rollout/generate.py), `Sampler.step_scores` token by token. Its log-probs
  are the trainer's own up to the round-off between a cached and a teacher-forced forward pass.
- vllm: a vLLM engine in the trainer's process (rollout/vllm_engine.py). It samples with vLLM's kernels under the
  same processing, mapped one to one onto vLLM's SamplingParams; the trainer replays that processing on its own
  teacher-forced logits exactly as for tether's loop, and vLLM's log-probs of the processed distribution it drew
  from are kept as the behaviour log-probs, whose gap to the trainer's is logged and corrected
  (losses/correction.py).

This module also holds the config rules of the engine keys (`engine_errors`, called by config_checks)."""

from collections.abc import Callable
from dataclasses import fields

import torch
from torch import Tensor

from tether.rollout.batch import Sampled  # noqa: F401 (what every engine returns)

from tether.rollout.sampling import Sampler

_VLLM_KEYS = ("vllm_gpu_memory_utilization", "vllm_max_model_len", "vllm_dtype", "vllm_enforce_eager")
_CORRECTION_KEYS = ("rollout_correction_level", "rollout_correction_cap")


def engine_errors(c) -> list[str]:
    """The rollout engine keys' problems, naming the key (a PPOConfig whose unset keys are resolved)."""
    problems = []
    defaults = {f.name: f.default for f in fields(c)}
    if c.rollout_engine not in ("tether", "vllm"):
        return [f"rollout_engine={c.rollout_engine!r} is not one of ['tether', 'vllm']"]
    if c.rollout_correction not in ("none", "tis", "mis"):
        problems.append(f"rollout_correction={c.rollout_correction!r} is not one of ['none', 'tis', 'mis']")
    if c.rollout_correction_level not in ("token", "sequence"):
        problems.append(f"rollout_correction_level={c.rollout_correction_level!r} is not one of "
                        f"['token', 'sequence']")
    if not (isinstance(c.rollout_correction_cap, (int, float)) and c.rollout_correction_cap > 1):
        problems.append(f"rollout_correction_cap={c.rollout_correction_cap!r} must be > 1 (the weights are 1 where "
                        f"engine and trainer agree)")
    if c.rollout_correction == "none":
        problems += [f"{k}={getattr(c, k)!r} only acts with rollout_correction tis or mis; leave it unset"
                     for k in _CORRECTION_KEYS if getattr(c, k) != defaults[k]]
    if c.rollout_engine == "tether":
        problems += [f"{k}={getattr(c, k)!r} only acts with rollout_engine=vllm; leave it unset"
                     for k in _VLLM_KEYS if getattr(c, k) != defaults[k]]
        if c.rollout_correction != "none":
            problems.append(f"rollout_correction={c.rollout_correction} with rollout_engine=tether: tether's own "
                            f"loop samples from the trainer's distribution, so the weights would all be 1; it "
                            f"corrects vLLM's log-prob gap (rollout_engine=vllm)")
        return problems
    if not 0 < c.vllm_gpu_memory_utilization <= 1:
        problems.append(f"vllm_gpu_memory_utilization={c.vllm_gpu_memory_utilization!r} must be in (0, 1]")
    if c.vllm_max_model_len is not None and not c.vllm_max_model_len > c.max_new_tokens:
        problems.append(f"vllm_max_model_len={c.vllm_max_model_len!r} must exceed max_new_tokens={c.max_new_tokens} "
                        f"(it holds the prompt and the completion)")
    if c.vllm_dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"vllm_dtype={c.vllm_dtype!r} is not one of ['auto', 'float32', 'bfloat16', 'float16']")
    if 0 < c.temperature < 1e-5:  # vLLM's _SAMPLING_EPS: below it a request is decoded greedily
        problems.append(f"temperature={c.temperature!r} with rollout_engine=vllm: vLLM decodes greedily below 1e-5, "
                        f"which is not the distribution tether replays; use a temperature of at least 1e-5")
    if c.no_repeat_ngram_size:
        problems.append(f"no_repeat_ngram_size={c.no_repeat_ngram_size} with rollout_engine=vllm: vLLM has no n-gram "
                        f"blocking to sample with; use rollout_engine=tether, or leave it at 0")
    return problems


def check_engine(c, logits_processors, sharding: str) -> None:
    """ValueError naming what the configured engine cannot do with this trainer's arguments and launch."""
    refused = vllm_refusals(logits_processors, sharding) if c.rollout_engine == "vllm" else []
    if refused:
        raise ValueError("; ".join(refused))


def vllm_refusals(logits_processors, sharding: str) -> list[str]:
    """What rollout_engine=vllm refuses at trainer set-up, before any model loads."""
    problems = []
    if logits_processors:
        names = sorted(type(p).__name__ for p in logits_processors)
        problems.append(f"logits_processors {names} with rollout_engine=vllm: vLLM cannot sample with transformers' "
                        f"processors; use rollout_engine=tether (which replays them) or drop them")
    if sharding:
        problems.append(f"rollout_engine=vllm with sharded parameters ({sharding}): the engine needs the whole "
                        f"weights on every process after each update, which tether does not gather yet; use DDP or "
                        f"DeepSpeed ZeRO-2, or rollout_engine=tether")
    return problems


def build_engine(trainer, generator: torch.Generator):
    """The engine `trainer.config.rollout_engine` names, built from the trainer's parts (at set-up, once)."""
    return ENGINES[trainer.config.rollout_engine](trainer, generator)


def _own_loop(t, generator: torch.Generator) -> "OwnLoop":
    # sharded parameters: every process runs every decoding step until all are done
    all_done = (lambda ended: t.comm.all(bool(ended.all()))) if t.ranks.sharded else None
    return OwnLoop(t.trainable, t.sampler, t.config.max_new_tokens, t.tokenizer.pad_token_id, t.device, t.autocast,
                   generator, all_done)


def _vllm(t, generator: torch.Generator):
    from tether.models.policy import context_length
    from tether.rollout.vllm_engine import VLLMEngine

    c = t.config
    longest = max((len(p) for p in t.encoded_prompts), default=0)
    length = c.vllm_max_model_len or (longest + c.max_new_tokens if longest else context_length(t.policy.model.config)
                                      or 2048)
    return VLLMEngine(c, t.policy.model, t.eos_token_ids, generator, length, t.autocast_dtype, t.comm.rank)


ENGINES: dict[str, Callable] = {"tether": _own_loop, "vllm": _vllm}


class OwnLoop:
    """tether's decoding loop as an engine (rollout/generate.py: sample, via the trained module)."""

    def __init__(self, trainable, sampler: Sampler, max_new_tokens: int, pad_token_id: int, device: torch.device,
                 autocast: Callable, generator: torch.Generator, all_done: Callable | None) -> None:
        self.trainable, self.sampler, self.max_new_tokens = trainable, sampler, max_new_tokens
        self.pad_token_id, self.device, self.autocast = pad_token_id, device, autocast
        self.generator, self.all_done = generator, all_done

    def weights_changed(self) -> None:
        """Nothing to do: the loop samples with the trained module itself."""

    def __call__(self, queries: list[Tensor]) -> Sampled:
        from tether.trainers.batching import left_pad  # here: importing tether.trainers imports this module

        ids, mask = left_pad(queries, self.pad_token_id)
        with self.autocast():
            rollout = self.trainable.rollout(self.sampler, ids.to(self.device), mask.to(self.device),
                                             self.max_new_tokens, self.pad_token_id, self.generator,
                                             all_done=self.all_done)
        lengths = rollout.response_mask.sum(-1).long().tolist()
        return Sampled([rollout.response_ids[i, :n].cpu() for i, n in enumerate(lengths)],
                       [rollout.sample_logprobs[i, :n].float().cpu() for i, n in enumerate(lengths)])
