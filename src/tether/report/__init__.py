"""Run-folder output: metric sinks while training, a readable report afterwards.

`build_report` imports matplotlib only when called, so the trainer can import
`tether.report.sinks` without paying for it.
"""

from __future__ import annotations

from pathlib import Path


def build_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write `run_dir/report/` (one PNG per curve + report.html); return the HTML's path. output: another
    .html path for the page (its PNGs beside it).

    Reads `run_dir/metrics.jsonl` (required: a missing file or a malformed line
    raises, naming the file and line) and `run_dir/samples.jsonl` (optional).
    """
    from tether.report.html import render_page
    from tether.report.plots import draw_plots
    from tether.report.runfiles import read_metrics, read_samples

    run_dir = Path(run_dir)
    series = read_metrics(run_dir / "metrics.jsonl")
    samples = read_samples(run_dir / "samples.jsonl")
    page = run_dir / "report" / "report.html" if output is None else Path(output)
    if page.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--output {str(page)!r} must be an .html file path (the plots are written beside it)")
    out_dir = page.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = draw_plots(series, out_dir)
    page.write_text(render_page(run_dir.resolve().name, series, plots, samples), encoding="utf-8")
    return page


def build_comparison(run_dirs: list[str | Path], output: str | Path) -> Path:
    """Several runs on the same axes, with a table of their summaries and config differences: see compare.py."""
    from tether.report.compare import build_comparison as build

    return build(run_dirs, output)


__all__ = ["build_comparison", "build_report"]
