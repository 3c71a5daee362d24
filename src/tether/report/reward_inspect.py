"""`tether inspect-reward`: what does this reward actually reward?

Three views: scores of texts the user picks (a clearly positive and a clearly negative sentence should
differ, in the right direction); the distribution of scores over a dataset (summary numbers and a
histogram); and how much of the reward's variance the prompt alone explains. A reward whose variance is
mostly the prompt's gives PPO little to learn from the completion, and query_baseline (r(q + a) - r(q))
is the usual fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from tether.rewards import score_batch
from tether.reward_data import read_rows


def summarize(scores: Tensor) -> dict[str, float]:
    """Count, mean, std and quantiles of (N,) scores."""
    s = scores.double()
    q = torch.quantile(s, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
    return {"count": len(s), "mean": s.mean().item(), "std": s.std().item() if len(s) > 1 else 0.0,
            "min": s.min().item(), "p5": q[0], "p25": q[1], "median": q[2], "p75": q[3], "p95": q[4],
            "max": s.max().item()}


def prompt_r2(scores: Tensor, prompt_scores: Tensor) -> tuple[float, dict[str, float]]:
    """Share of the variance of r(q + a) linearly explained by r(q), the prompt scored alone: the squared
    Pearson correlation (the R^2 of a least-squares line). 0 when either side is constant."""
    x, y = prompt_scores.double(), scores.double()
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return 0.0, {"corr": 0.0}
    corr = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    return corr**2, {"corr": corr}


def between_prompt_share(scores: Tensor, prompts: list[str]) -> tuple[float | None, dict[str, float]]:
    """eta^2 of a one-way ANOVA: between-prompt sum of squares / total sum of squares. It counts every way
    the prompt shapes the reward, not only the linear one, but needs prompts with several completions each;
    None when no prompt repeats."""
    s = scores.double()
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    if len(groups) == len(prompts):
        return None, {"prompts": len(groups)}
    total = ((s - s.mean()) ** 2).sum().item()
    between = sum(len(idx) * (s[idx].mean() - s.mean()).item() ** 2 for idx in groups.values())
    return (between / total if total > 0 else 0.0), {"prompts": len(groups)}


def plot_histogram(scores: Tensor, path: Path, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(scores.double().numpy(), bins=min(40, max(5, len(scores) // 5)), color="#4c72b0")
    ax.axvline(scores.double().mean().item(), color="k", linestyle="--", linewidth=1, label="mean")
    ax.set(title=title, xlabel="reward", ylabel="count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _dataset_view(reward, source, max_rows: int) -> tuple[list[str], list[str], dict]:
    """(prompts, completions, extra) of the rows to score; pairs contribute both responses."""
    rows, where = read_rows(source, "inspect data")
    rows = rows[:max_rows]
    keys = set().union(*(r.keys() for r in rows))
    extra: dict = {}
    if {"chosen", "rejected"} <= keys:
        from tether.reward_data import check_pairs

        pairs = check_pairs(rows, where)
        chosen = score_batch(reward, pairs.prompts, pairs.chosen)
        rejected = score_batch(reward, pairs.prompts, pairs.rejected)
        extra["pairs"] = {"count": len(pairs), "accuracy": ((chosen > rejected).double().mean().item()),
                          "margin_mean": (chosen - rejected).mean().item()}
        return pairs.prompts + pairs.prompts, pairs.chosen + pairs.rejected, extra
    column = "completion" if "completion" in keys else "text" if "text" in keys else None
    if column is None:
        raise ValueError(f"{where}: rows need `text`, `prompt` + `completion`, or `prompt` + `chosen` + `rejected`; "
                         f"row 0 has {sorted(rows[0])}")
    prompts, completions = [], []
    for i, row in enumerate(rows):
        for key in (column, "prompt"):
            value = row.get(key, "" if key == "prompt" else None)
            if not isinstance(value, str):
                raise TypeError(f"{where}, row {i}: {key!r} must be a string, got {type(value).__name__} {value!r}")
        prompts.append(row.get("prompt", ""))
        completions.append(row[column])
    return prompts, completions, extra


def inspect_reward(reward, texts: list[str] | None = None, data=None, output_dir: str | Path = "runs/inspect-reward",
                   max_rows: int = 2000, name: str = "reward") -> dict:
    """Score `texts` one by one and summarise `data`; write OUTPUT_DIR/reward_inspect.json and, for data,
    OUTPUT_DIR/reward_histogram.png. Returns the same record."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"reward": name}
    if texts:
        scores = score_batch(reward, [""] * len(texts), list(texts))
        record["texts"] = [{"text": t, "score": s} for t, s in zip(texts, scores.tolist())]
    if data is not None:
        prompts, completions, extra = _dataset_view(reward, data, max_rows)
        scores = score_batch(reward, prompts, completions)
        record["distribution"] = summarize(scores)
        record.update(extra)
        if any(p for p in prompts):
            unique = list(dict.fromkeys(prompts))
            alone = dict(zip(unique, score_batch(reward, unique, [""] * len(unique)).tolist()))
            r2, stats = prompt_r2(scores, torch.tensor([alone[p] for p in prompts]))
            eta2, _ = between_prompt_share(scores, prompts)
            record["prompt_share"] = {"r2_of_prompt_alone": r2, "corr": stats["corr"],
                                      "between_prompt_share": eta2, "prompts": len(unique)}
        record["histogram"] = str(plot_histogram(scores, out / "reward_histogram.png",
                                                 f"{name}: {len(scores)} scores"))
    (out / "reward_inspect.json").write_text(json.dumps(record, indent=2))
    return record


def describe(record: dict) -> str:
    """The record as a few readable lines for the console."""
    lines = [f"reward: {record['reward']}"]
    for row in record.get("texts", []):
        lines.append(f"  {row['score']:+9.4f}  {row['text']!r}")
    if "distribution" in record:
        d = record["distribution"]
        lines.append(f"distribution over {d['count']} texts: mean {d['mean']:.4f}, std {d['std']:.4f}, "
                     f"min {d['min']:.4f}, p5 {d['p5']:.4f}, median {d['median']:.4f}, p95 {d['p95']:.4f}, "
                     f"max {d['max']:.4f}")
    if "pairs" in record:
        p = record["pairs"]
        lines.append(f"pairs: {p['count']}, accuracy {p['accuracy']:.3f}, mean margin {p['margin_mean']:.4f}")
    if "prompt_share" in record:
        s = record["prompt_share"]
        eta = s["between_prompt_share"]
        lines.append(f"variance explained by the prompt alone: R^2 {s['r2_of_prompt_alone']:.3f} (r(q+a) vs r(q))"
                     + (f", between-prompt share {eta:.3f}" if eta is not None else "")
                     + f" over {s['prompts']} prompts")
    if "histogram" in record:
        lines.append(f"histogram: {record['histogram']}")
    return "\n".join(lines)
