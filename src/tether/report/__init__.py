"""Run-folder output: metric sinks while training, a readable report afterwards.

`build_report` imports matplotlib only when called, so the trainer can import
`tether.report.sinks` without paying for it.
"""

from __future__ import annotations

from pathlib import Path


def build_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report/` (one PNG per curve + report.html); return the HTML's path.

    Reads `run_dir/metrics.jsonl` (required: a missing file or a malformed line
    raises, naming the file and line) and `run_dir/samples.jsonl` (optional).
    """
    from tether.report.html import render_page
    from tether.report.plots import draw_plots
    from tether.report.runfiles import read_metrics, read_samples

    run_dir = Path(run_dir)
    series = read_metrics(run_dir / "metrics.jsonl")
    samples = read_samples(run_dir / "samples.jsonl")
    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = draw_plots(series, out_dir)
    page = out_dir / "report.html"
    page.write_text(render_page(run_dir.resolve().name, series, plots, samples), encoding="utf-8")
    return page


__all__ = ["build_report"]
