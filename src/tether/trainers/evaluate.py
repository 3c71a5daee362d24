"""Held-out evaluation: completions of `eval_prompts`, scored by the run's reward.

Greedy by default (top_k=1: the argmax of the policy's logits), so the number moves only when the policy does,
not with sampling noise; `eval_sampling: train` samples as training does. Its own generator (seeded alike every
time), so evaluating never changes the training run's random draws. A reward with
state (a running normalisation) is put back as it was afterwards: evaluation must not move what training sees.
On several processes each takes an equal share (the last prompt repeated, uncounted, to even them out), so
sharded models decode in step, and the means are over every process's rows."""

import copy
from functools import partial
import math

import torch

from tether.chat import reward_text
from tether.rewards import score_batch
from tether.rollout import Sampler
from tether.trainers.batching import left_pad
from tether.trainers.collect import completion_info


def due(trainer, fresh_start: bool = False) -> bool:
    """Whether to evaluate now: before the first step of a fresh run, every eval_every steps, after the last."""
    c, step = trainer.config, trainer.step_count
    if trainer.eval_rows is None:
        return False
    if fresh_start:
        return step == 0
    return step == c.steps or bool(c.eval_every and step % c.eval_every == 0)


def maybe_evaluate(trainer, fresh_start: bool = False) -> dict[str, float]:
    """evaluate(trainer) when it is due (see `due`), else {}."""
    return evaluate(trainer) if due(trainer, fresh_start) else {}


@torch.no_grad()
def evaluate(trainer) -> dict[str, float]:
    """eval/reward_mean (and eval/reward/<name>_mean per function of a reward spec, eval/response_len_mean) over
    the held-out prompts."""
    c, comm, rows, tok = trainer.config, trainer.comm, trainer.eval_rows, trainer.tokenizer
    n = len(rows.prompts)
    per = math.ceil(n / comm.num)
    mine = range(comm.rank * per, (comm.rank + 1) * per)
    index, weight = [min(i, n - 1) for i in mine], torch.tensor([float(i < n) for i in mine], dtype=torch.float64)
    sampler = Sampler(trainer.eos_token_ids, 1.0, top_k=1) if c.eval_sampling == "greedy" else trainer.sampler
    generator = torch.Generator(trainer.device).manual_seed(c.seed)
    state = copy.deepcopy(trainer.reward.state_dict()) if hasattr(trainer.reward, "load_state_dict") else None
    totals = {}
    for start in range(0, per, c.batch_size):
        chunk = index[start:start + c.batch_size]
        queries = [trainer.encode(rows.prompts[i], f"eval_prompts row {i}") for i in chunk]
        ids, mask = left_pad(queries, tok.pad_token_id)
        with trainer.autocast():
            rollout = trainer.trainable.rollout(sampler, ids.to(trainer.device), mask.to(trainer.device),
                                                c.max_new_tokens, tok.pad_token_id, generator,
                                                all_done=partial(_all_done, comm) if trainer.ranks.sharded else None)
        lengths = rollout.response_mask.sum(-1).long().tolist()
        responses = [rollout.response_ids[i, :k].cpu() for i, k in enumerate(lengths)]
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        info = completion_info(responses, trainer.eos_token_ids)
        info.update({k: [rows.columns[i].get(k) for i in chunk] for k in trainer.reward_keywords if k not in info})
        scores = score_batch(trainer.reward, [reward_text(tok, rows.prompts[i]) for i in chunk], texts,
                             {k: info[k] for k in trainer.reward_keywords})
        w = weight[start:start + c.batch_size]
        parts = {"eval/reward_mean": scores, "eval/response_len_mean": torch.tensor(lengths, dtype=torch.float64),
                 **{f"eval/reward/{k}_mean": v for k, v in getattr(trainer.reward, "parts", {}).items()}}
        for key, values in parts.items():
            totals[key] = totals.get(key, 0.0) + (values.double().cpu() * w).sum()
    if state is not None:
        trainer.reward.load_state_dict(state)
    keys = list(totals)
    sums = comm.all_reduce(torch.stack([torch.as_tensor(totals[k]) for k in keys] + [weight.sum()]).to(trainer.device))
    return {k: (sums[j] / sums[-1]).item() for j, k in enumerate(keys)}


def _all_done(comm, finished) -> bool:
    return comm.all(bool(finished.all()))
