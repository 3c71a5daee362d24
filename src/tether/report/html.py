"""The run report page: a summary table, the plots, and what the model said.

Plain string building with `html.escape` on every value from the run (prompts
and completions are model output and may contain anything, markup included),
so the page needs no template engine and is one self-contained file beside its
PNGs.
"""

from __future__ import annotations

import math
from html import escape

from tether.report.plots import KL_BAND, Plot
from tether.report.runfiles import Series

SAMPLE_ROWS_MAX = 32  # per table; the full set is in samples.jsonl

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; max-width: 30em; }
.plots img { max-width: 100%; display: block; margin: 0.8em 0; border: 1px solid #eee; }
.note { color: #666; } .bad { color: #b00; font-weight: 600; } .good { color: #070; }
"""


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.4g}" if isinstance(value, (int, float)) else escape(str(value))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(series: dict[str, Series]) -> list[tuple[str, str]]:
    """(label, html) rows of the summary table; values are already escaped/formatted."""
    steps = sorted({step for key, s in series.items() if not key.startswith("eval/") for step in s.steps})
    rows = [("Steps logged", f"{len(steps)}" + (f" (step {steps[0]} to {steps[-1]})" if steps else ""))]
    reward = series.get("env/reward_mean", Series()).values
    first, last = _mean(reward[:3]), _mean(reward[-3:])
    change = None if first is None else last - first
    sign = "+" if change is not None and change > 0 else ""
    if 0 < len(reward) < 6:
        rows.append(("Note", f'<span class="note">only {len(reward)} rewards logged: the first and last 3 overlap</span>'))
    rows += [
        ("Mean reward, first 3 steps", _fmt(first)),
        ("Mean reward, last 3 steps", _fmt(last)),
        ("Change in mean reward", sign + _fmt(change)),
    ]
    kl = series.get("objective/kl", Series())
    rows.append(("Final objective/kl", _fmt(kl.values[-1] if kl.values else None)))
    low, high = KL_BAND
    outside = [(s, v) for s, v in zip(kl.steps, kl.values) if not low <= v <= high]
    if not kl.values:
        verdict = '<span class="note">no objective/kl logged</span>'
    elif not outside:
        verdict = f'<span class="good">yes, all {len(kl.values)} steps</span>'
    else:
        shown = ", ".join(f"step {s}: {_fmt(v)}" for s, v in outside[:5])
        more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        verdict = f'<span class="bad">no, {len(outside)} of {len(kl.values)} steps outside ({shown}{more})</span>'
    rows.append((f"KL stayed in [{low:g}, {high:g}]", verdict))
    held_out = series.get("eval/reward_mean", Series())
    if held_out.values:  # eval_prompts: greedy completions of prompts never trained on
        rows.append(("Held-out reward (eval/reward_mean), by step", ", ".join(
            f"step {s}: {_fmt(v)}" for s, v in zip(held_out.steps, held_out.values))))
        rows.append(("Change in held-out reward, first to last evaluation",
                     ("+" if held_out.values[-1] > held_out.values[0] else "")
                     + _fmt(held_out.values[-1] - held_out.values[0])))
    return rows


def _samples_table(rows: list[dict], step: int) -> str:
    shown = rows[:SAMPLE_ROWS_MAX]
    note = f'<p class="note">Showing {len(shown)} of {len(rows)}.</p>' if len(rows) > len(shown) else ""
    body = "".join(
        f'<tr><td class="text">{escape(str(r.get("prompt", "")))}</td>'
        f'<td class="text">{escape(str(r.get("completion", "")))}</td>'
        f'<td class="num">{_fmt(r.get("score"))}</td><td class="num">{_fmt(r.get("kl"))}</td></tr>'
        for r in shown
    )
    head = "<tr><th>Prompt</th><th>Completion</th><th>Score</th><th>KL</th></tr>"
    return f"<h3>Step {step}</h3>{note}<table>{head}{body}</table>"


def samples_section(samples: list[dict]) -> str:
    """Tables for the first and the last step that logged samples."""
    if not samples:
        return '<p class="note">No samples were logged for this run (samples.jsonl is missing or empty).</p>'
    steps = sorted({row["step"] for row in samples})
    chosen = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
    tables = [_samples_table([r for r in samples if r["step"] == step], step) for step in chosen]
    lone = '<p class="note">Only one step logged samples.</p>' if len(chosen) == 1 else ""
    return lone + "".join(tables)


def _plots_section(plots: list[Plot]) -> str:
    parts = []
    for plot in plots:
        if plot.file:
            parts.append(f'<img src="{escape(plot.file)}" alt="{escape(plot.title)}">')
        else:
            parts.append(f'<p class="note">{escape(plot.title)}: <code>{escape(plot.key)}</code> was not logged.</p>')
    return '<div class="plots">' + "".join(parts) + "</div>"


def render_page(run_name: str, series: dict[str, Series], plots: list[Plot], samples: list[dict]) -> str:
    summary = "".join(f"<tr><th>{escape(label)}</th><td>{value}</td></tr>" for label, value in summarize(series))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>tether run: {escape(run_name)}</title><style>{CSS}</style></head><body>"
        f"<h1>tether run: {escape(run_name)}</h1>"
        '<p class="note">Built from metrics.jsonl and samples.jsonl in the run folder.</p>'
        f"<h2>Summary</h2><table>{summary}</table>"
        f"<h2>Training curves</h2>{_plots_section(plots)}"
        f"<h2>Samples</h2>{samples_section(samples)}"
        "</body></html>\n"
    )
