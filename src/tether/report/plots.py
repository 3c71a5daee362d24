"""One PNG per headline metric of a run, drawn with matplotlib's Agg canvas.

Figures are built from `matplotlib.figure.Figure` directly rather than pyplot,
so drawing a report neither switches the caller's backend nor leaks figures
into pyplot's global registry (the pattern matplotlib's docs give for web
servers: "Embedding in a web application server (Flask)").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tether.report.runfiles import Series

# The FAQ's target band for objective/kl (see docs/ and the KL controller).
KL_BAND = (0.0, 10.0)
MARKER_MAX_POINTS = 40  # short runs get markers so three points read as three points


@dataclass(frozen=True)
class Plot:
    """A plot the report shows: `file` is None when its metric was never logged."""

    key: str
    title: str
    ylabel: str
    file: str | None = None


PLOTS = (
    Plot("env/reward_mean", "Mean reward", "reward (mean over batch)"),
    Plot("objective/kl", "KL to the reference model", "KL per response (nats, batch mean)"),
    Plot("objective/entropy", "Policy entropy", "entropy (nats)"),
    Plot("tokens/response_len_mean", "Response length", "tokens (mean over batch)"),
    Plot("ppo/loss/value", "Value loss", "ppo/loss/value"),
)
# Drawn only when the run logged them (no "was not logged" note): runs without eval_prompts have none.
OPTIONAL_PLOTS = (
    Plot("eval/reward_mean", "Held-out reward (eval_prompts, greedy; the accuracy for a 0/1 verifier)",
         "reward (mean over held-out prompts)"),
)


def _axes(title: str, ylabel: str):
    figure = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel("PPO step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "step 2.5" on short runs
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _line(axes, series: Series, label: str) -> None:
    marker = "o" if len(series.values) <= MARKER_MAX_POINTS else None
    axes.plot(series.steps, series.values, marker=marker, markersize=3, linewidth=1.5, label=label)


def _reward_band(axes, mean: Series, std: Series) -> None:
    """Shade mean +- std at the steps that logged both."""
    std_at = dict(zip(std.steps, std.values))
    points = [(s, m, std_at[s]) for s, m in zip(mean.steps, mean.values) if s in std_at]
    if points:
        steps = [p[0] for p in points]
        axes.fill_between(
            steps, [m - s for _, m, s in points], [m + s for _, m, s in points],
            alpha=0.2, label="± reward std",
        )


def _kl_band(axes) -> None:
    """Shade the target band over the y-range the data already chose.

    The range is kept (read, then set back) because a KL of 0.05 drawn on a
    0-10 axis would be a flat line on the floor; while the run stays inside
    the band, the whole view is shaded and the legend says what that means.
    """
    view = axes.get_ylim()  # matplotlib autoscales lazily; reading forces it now
    low, high = KL_BAND
    axes.axhspan(low, high, color="tab:green", alpha=0.12, label=f"target band [{low:g}, {high:g}]")
    for edge in KL_BAND:
        axes.axhline(edge, color="tab:green", linestyle="--", linewidth=0.8)
    axes.set_ylim(view)


def draw_plots(series: dict[str, Series], out_dir: Path) -> list[Plot]:
    """Write `<name>.png` into `out_dir` for each metric in PLOTS that was logged."""
    drawn = []
    for plot in PLOTS + tuple(p for p in OPTIONAL_PLOTS if series.get(p.key) and series[p.key].values):
        data = series.get(plot.key)
        if data is None or not data.values:
            drawn.append(plot)
            continue
        figure, axes = _axes(plot.title, plot.ylabel)
        _line(axes, data, plot.key)
        if plot.key == "env/reward_mean" and "env/reward_std" in series:
            _reward_band(axes, data, series["env/reward_std"])
        if plot.key == "objective/kl":
            _kl_band(axes)
        axes.legend(loc="best", fontsize="small")
        name = plot.key.replace("/", "_") + ".png"
        figure.savefig(out_dir / name)
        drawn.append(Plot(plot.key, plot.title, plot.ylabel, name))
    return drawn


def draw_comparison(runs: dict[str, dict[str, Series]], out_dir: Path) -> list[Plot]:
    """Write `compare_<name>.png` into `out_dir` for each metric in PLOTS, every run's curve on the same axes
    (labelled by the keys of `runs`); a Plot without a file when no run logged that metric."""
    drawn = []
    logged = lambda key: any(key in s and s[key].values for s in runs.values())  # noqa: E731
    for plot in PLOTS + tuple(p for p in OPTIONAL_PLOTS if logged(p.key)):
        present = {label: series[plot.key] for label, series in runs.items()
                   if plot.key in series and series[plot.key].values}
        if not present:
            drawn.append(plot)
            continue
        figure, axes = _axes(plot.title, plot.ylabel)
        for label, data in present.items():
            _line(axes, data, label)
        if plot.key == "objective/kl":
            _kl_band(axes)
        axes.legend(loc="best", fontsize="small")
        name = "compare_" + plot.key.replace("/", "_") + ".png"
        figure.savefig(out_dir / name)
        drawn.append(Plot(plot.key, plot.title, plot.ylabel, name))
    return drawn
