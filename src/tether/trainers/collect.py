"""Steps 1-2 of train(): the step's prompts, their completions and the reward's scores; with dynamic_sampling,
DAPO's over-sampling (Yu et al. 2025, sec. 3.2) until every group in the batch has something to learn from. And the
length rules that every step applies to the scores and to the loss (missing_eos_penalty, overlong)."""

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tether.chat import readable
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
    prompts: list  # each completion's prompt as the reward sees it (a conversation: its chat template's text)
    generation: Generation
    scores: Tensor  # (B,) the reward's, before the length rules
    keep: Tensor | None = None  # (B,) bool, dynamic sampling: False on rows filled in from dropped groups
    stats: dict = field(default_factory=dict)
    shown: list = field(default_factory=list)  # each completion's prompt for people (conversations as lines)
    columns: dict = field(default_factory=dict)  # name -> (B,) list: the keywords the reward got, per completion
    parts: dict = field(default_factory=dict)  # name -> (B,) scores of each function of a weighted reward spec


def collect(trainer) -> Collected:
    """This process's rows of the next batch: prompts in data order, one completion each (num_generations per
    prompt), scored. With dynamic_sampling, groups of equal scores (after the length rules) are set aside and the
    next prompts sampled, every process in step with the others, for at most dynamic_sampling_max_rounds extra
    rounds; a batch still short then is filled with set-aside groups, which `keep` leaves out of the loss. The
    rows keep their prompt row's columns and their reward parts through the regrouping. stats: dynamic
    sampling's counts and env/reward/<name>_mean of each reward function over every process's rows."""
    c, comm = trainer.config, trainer.comm
    G = c.num_generations
    kept, spare, dropped, rounds = [], [], 0, 0
    while True:
        got = _sample(trainer)
        if not c.dynamic_sampling:
            return _with_part_means(comm, trainer.device, got)
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
    got = _concat(groups)
    got.keep = keep
    got.stats = {"dynamic_sampling/dropped_groups": counts[0].item(), "dynamic_sampling/extra_rounds": float(rounds),
                 "dynamic_sampling/filled_groups": counts[1].item()}
    return _with_part_means(comm, trainer.device, got)


def _sample(trainer) -> Collected:
    """1-2: the next batch_size / num_generations prompts (this process's share), generated and scored, each
    completion with its own prompt row's columns."""
    c, comm = trainer.config, trainer.comm
    G = c.num_generations
    indices = [i for i in trainer.progress.next_prompts(c.batch_size // G, len(trainer.prompts)) for _ in range(G)]
    indices = indices[comm.rank * trainer.local_batch:(comm.rank + 1) * trainer.local_batch]
    # prompt_texts / prompt_columns: a trainer-like stub with plain string prompts may leave them out
    texts, columns_of = getattr(trainer, "prompt_texts", trainer.prompts), getattr(trainer, "prompt_columns", None)
    prompts = [texts[i] for i in indices]
    gen = trainer.generate([trainer.encoded_prompts[i] for i in indices])  # 1
    info = completion_info(gen.responses, trainer.eos_token_ids)
    info.update({k: [columns_of[i].get(k) for i in indices] for k in trainer.reward_keywords if k not in info})
    columns = {k: info[k] for k in trainer.reward_keywords}
    scores = score_batch(trainer.reward, prompts, gen.texts, columns)  # 2
    parts = {k: v.detach().float().cpu() for k, v in getattr(trainer.reward, "parts", {}).items()}
    return Collected(prompts, gen, scores, shown=[readable(trainer.prompts[i]) for i in indices], columns=columns,
                     parts=parts)


def completion_info(responses: list[Tensor], eos_token_ids: list[int]) -> dict[str, list]:
    """What tether knows about each completion (rewards.COMPLETION_INFO), one list entry per completion."""
    return {"ended": ended(responses, eos_token_ids).tolist(), "completion_tokens": [len(r) for r in responses]}


def _rows(got: Collected, rows) -> Collected:
    """The rows `rows` of `got`, every per-row field with them."""
    rows, g = list(rows), got.generation
    pick = lambda part: [part[i] for i in rows]  # noqa: E731
    return Collected(pick(got.prompts), Generation(pick(g.queries), pick(g.responses), pick(g.texts),
                                                   None if g.logprobs is None else pick(g.logprobs)),
                     got.scores[rows], shown=pick(got.shown), columns={k: pick(v) for k, v in got.columns.items()},
                     parts={k: v[rows] for k, v in got.parts.items()})


def _concat(parts: list[Collected]) -> Collected:
    """The rows of `parts` one after the other."""
    cat = lambda get: sum((list(get(p)) for p in parts), [])  # noqa: E731
    first = parts[0]
    return Collected(cat(lambda p: p.prompts),
                     Generation(cat(lambda p: p.generation.queries), cat(lambda p: p.generation.responses),
                                cat(lambda p: p.generation.texts),
                                None if first.generation.logprobs is None else cat(lambda p: p.generation.logprobs)),
                     torch.cat([p.scores for p in parts]), shown=cat(lambda p: p.shown),
                     columns={k: cat(lambda p: p.columns[k]) for k in first.columns},
                     parts={k: torch.cat([p.parts[k] for p in parts]) for k in first.parts})


def _with_part_means(comm, device, got: Collected) -> Collected:
    """got, its stats with env/reward/<name>_mean per reward function: the mean over every process's rows."""
    if got.parts:
        names = list(got.parts)
        sums = torch.stack([got.parts[k].double().sum() for k in names] + [torch.tensor(len(got.scores)).double()])
        sums = comm.all_reduce(sums.to(device))
        got.stats.update({f"env/reward/{k}_mean": (sums[j] / sums[-1]).item() for j, k in enumerate(names)})
    return got
