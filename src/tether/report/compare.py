"""Several runs side by side: their curves on the same axes, their summaries in one table, and the config keys
in which they differ, in one report.html (PNGs beside it), so that a change reads against its baseline."""

from __future__ import annotations

from html import escape
from pathlib import Path

import yaml

from tether.report.html import CSS, _fmt, _plots_section, summarize
from tether.report.plots import draw_comparison
from tether.report.runfiles import read_metrics

IGNORED_KEYS = {"output_dir", "resume"}  # where a run went and how it started say nothing about what it did


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Short distinct names: each folder's name, with as many parent folders as it takes to tell them apart."""
    parts = [p.resolve().parts for p in run_dirs]
    if len(set(parts)) < len(parts):  # the same folder given twice
        return [f"{p[-1]} ({i + 1})" for i, p in enumerate(parts)]
    labels = []
    for i, mine in enumerate(parts):
        depth = next(d for d in range(1, len(mine) + 1)
                     if all(other[-d:] != mine[-d:] for j, other in enumerate(parts) if j != i))
        labels.append("/".join(mine[-depth:]))
    return labels


def _config(run_dir: Path) -> dict | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
    return loaded


def config_differences(configs: list[dict | None]) -> list[tuple[str, list[str]]]:
    """(key, one formatted value per run) for every key whose value is not the same in all runs that have a
    config.yaml (a run without one shows a dash)."""
    known = [c for c in configs if c is not None]
    keys = sorted({k for c in known for k in c} - IGNORED_KEYS)
    rows = []
    for key in keys:
        values = [c.get(key, "(unset)") if c is not None else None for c in configs]
        if len({repr(v) for v, c in zip(values, configs) if c is not None}) > 1:
            rows.append((key, ["—" if c is None else escape(str(v)) for v, c in zip(values, configs)]))
    return rows


def build_comparison(run_dirs: list[str | Path], output: str | Path) -> Path:
    """Write the comparison page to `output` (an .html path; its folder gets the PNGs) and return its path."""
    run_dirs = [Path(d) for d in run_dirs]
    if len(run_dirs) < 2:
        raise ValueError("a comparison needs at least two run folders")
    output = Path(output)
    if output.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--output {str(output)!r} must be an .html file path (the plots are written beside it)")
    labels = run_labels(run_dirs)
    series = {label: read_metrics(d / "metrics.jsonl") for label, d in zip(labels, run_dirs)}
    configs = [_config(d) for d in run_dirs]
    output.parent.mkdir(parents=True, exist_ok=True)
    plots = draw_comparison(series, output.parent)
    output.write_text(render_comparison(labels, run_dirs, series, configs, plots), encoding="utf-8")
    return output


def render_comparison(labels, run_dirs, series, configs, plots) -> str:
    head = "<tr><th></th>" + "".join(f"<th>{escape(label)}</th>" for label in labels) + "</tr>"
    summaries = [dict(summarize(series[label])) for label in labels]
    rows = [label for label, _ in summarize(series[labels[0]])]
    rows += [r for s in summaries for r in s if r not in rows]  # e.g. a note only one run has
    summary = "".join(f"<tr><th>{escape(row)}</th>" + "".join(f"<td>{s.get(row, '—')}</td>" for s in summaries)
                      + "</tr>" for row in rows)
    finals = []
    for key in ("objective/entropy", "tokens/response_len_mean", "ppo/loss/value"):
        values = [series[label].get(key) for label in labels]
        finals.append(f"<tr><th>Final {escape(key)}</th>" + "".join(
            f'<td class="num">{_fmt(v.values[-1] if v is not None and v.values else None)}</td>' for v in values)
            + "</tr>")
    differences = config_differences(configs)
    if differences:
        config_table = "<table>" + head + "".join(
            f"<tr><th><code>{escape(key)}</code></th>" + "".join(f"<td>{v}</td>" for v in values) + "</tr>"
            for key, values in differences) + "</table>"
    elif all(c is None for c in configs):
        config_table = '<p class="note">No run folder has a config.yaml.</p>'
    else:
        config_table = '<p class="note">The runs\' config.yaml files agree on every key (besides output_dir).</p>'
    where = "".join(f"<li><b>{escape(label)}</b>: <code>{escape(str(d.resolve()))}</code></li>"
                    for label, d in zip(labels, run_dirs))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>tether runs: {escape(' vs '.join(labels))}</title><style>{CSS}</style></head><body>"
        f"<h1>tether runs compared</h1><ul>{where}</ul>"
        '<p class="note">Built from each run folder\'s metrics.jsonl and config.yaml.</p>'
        f"<h2>Summary</h2><table>{head}{summary}{''.join(finals)}</table>"
        f"<h2>Config differences</h2>{config_table}"
        f"<h2>Training curves</h2>{_plots_section(plots)}"
        "</body></html>\n"
    )
