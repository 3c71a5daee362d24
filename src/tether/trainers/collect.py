"""Steps 1-2 of train(): the step's prompts, their completions and the reward's scores; with dynamic_sampling,
DAPO's over-sampling (Yu et al. 2025, sec. 3.2) until every group in the batch has something to learn from. And the
length rules that every step applies to the scores and to the loss (missing_eos_penalty, overlong)."""

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tether.rewards import score_batch
from tether.rollout.batch import Generation
from tether.trainers.setup import ended


def length_shaped(c, scores: Tensor, responses: list[Tensor], eos_token_ids: list[int]) -> Tensor:
    """The reward's scores (B,) with the length rules applied, before score_scale / score_norm / score_clip:
    missing_eos_penalty off every completion cut at max_new_tokens (TRL's), and with overlong=soft DAPO's soft
    overlong punishment (Yu et al. 2025, eq. 13): 0 up to max_new_tokens - overlong_buffer tokens, then falling
    linearly to -overlong_penalty at max_new_tokens."""
    shaped = scores - c.missing_eos_penalty * (~ended(responses, eos_token_ids)).to(scores.dtype)
    if c.overlong == "soft":
        lengths = torch.tensor([len(r) for r in responses], dtype=scores.dtype)
        over = (lengths - (c.max_new_tokens - c.overlong_buffer)).clamp(min=0)
        shaped = shaped - c.overlong_penalty * over / c.overlong_buffer
    return shaped


def loss_rows(c, responses: list[Tensor], eos_token_ids: list[int], keep: Tensor | None) -> Tensor | None:
    """(B,) 1 for the rows the loss trains on, 0 for those left out: with overlong=mask the completions cut at
    max_new_tokens (DAPO's overlong filtering), and the rows `keep` marks 0. None: every row."""
    if c.overlong != "mask" and keep is None:
        return None
    rows = torch.ones(len(responses))
    if c.overlong == "mask":
        rows = rows * ended(responses, eos_token_ids).float()
    return rows if keep is None else rows * keep.float()


def zero_variance_groups(scores: Tensor, group_size: int) -> Tensor:
    """(B / G,) bool: groups whose completions all got the same score. Their group advantage is 0 for every
    completion: nothing to learn from them. A group with a nan score is not one (the step's fault path sees it)."""
    g = scores.reshape(-1, group_size)
    return (g == g[:, :1]).all(-1)


@dataclass
class Collected:
    prompts: list  # each completion's prompt (as the reward sees it)
    generation: Generation
    scores: Tensor  # (B,) the reward's, before the length rules
    keep: Tensor | None = None  # (B,) bool, dynamic sampling: False on rows filled in from dropped groups
    stats: dict = field(default_factory=dict)


def collect(trainer) -> Collected:
    """This process's rows of the next batch: prompts in data order, one completion each (num_generations per
    prompt), scored. With dynamic_sampling, groups of equal scores (after the length rules) are set aside and the
    next prompts sampled, every process in step with the others, for at most dynamic_sampling_max_rounds extra
    rounds; a batch still short then is filled with set-aside groups, which `keep` leaves out of the loss."""
    c, comm = trainer.config, trainer.comm
    G = c.num_generations
    kept, spare, dropped, rounds = [], [], 0, 0
    while True:
        got = _sample(trainer)
        if not c.dynamic_sampling:
            return got
        shaped = length_shaped(c, got.scores.double(), got.generation.responses, trainer.eos_token_ids)
        for k, same in enumerate(zero_variance_groups(shaped, G).tolist()):
            (spare if same else kept).append(_rows(got, range(k * G, (k + 1) * G)))
            dropped += same
        if comm.all(len(kept) * G >= trainer.local_batch) or rounds == c.dynamic_sampling_max_rounds:
            break
        rounds += 1
    need = trainer.local_batch // G
    groups = kept[:need] + spare[:need - len(kept[:need])]
    keep = torch.tensor([i < len(kept[:need]) for i in range(need) for _ in range(G)])
    counts = comm.all_reduce(torch.tensor([float(dropped), float((~keep).sum()) / G], device=trainer.device))
    prompts, queries, responses, texts, scores = (sum((list(part[i]) for part in groups), []) for i in range(5))
    return Collected(prompts, Generation(queries, responses, texts), torch.tensor(scores), keep,
                     {"dynamic_sampling/dropped_groups": counts[0].item(), "dynamic_sampling/extra_rounds": float(rounds),
                      "dynamic_sampling/filled_groups": counts[1].item()})


def _sample(trainer) -> Collected:
    """1-2: the next batch_size / num_generations prompts (this process's share), generated and scored."""
    c, comm = trainer.config, trainer.comm
    G = c.num_generations
    indices = [i for i in trainer.progress.next_prompts(c.batch_size // G, len(trainer.prompts)) for _ in range(G)]
    indices = indices[comm.rank * trainer.local_batch:(comm.rank + 1) * trainer.local_batch]
    prompts = [trainer.prompts[i] for i in indices]
    gen = trainer.generate([trainer.encoded_prompts[i] for i in indices])  # 1
    info = {"ended": ended(gen.responses, trainer.eos_token_ids).tolist(),
            "completion_tokens": [len(r) for r in gen.responses]}
    scores = score_batch(trainer.reward, prompts, gen.texts, {k: info[k] for k in trainer.reward_keywords})  # 2
    return Collected(prompts, gen, scores)


def _rows(got: Collected, rows) -> tuple[list, ...]:
    """(prompts, queries, responses, texts, scores) of `rows`."""
    g = got.generation
    return tuple([part[i] for i in rows] for part in (got.prompts, g.queries, g.responses, g.texts,
                                                         got.scores.tolist()))
