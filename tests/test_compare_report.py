"""`tether report RUN_A RUN_B ...`: every run's curve on the same axes, a summary table, the config differences."""

import yaml

from tether.cli import main
from tether.report import compare, plots
from tether.report.plots import PLOTS
from tether.report.sinks import JsonlSink

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(run_dir, reward_slope: float, kl_final: float, config: dict | None, value_loss: bool = True):
    run_dir.mkdir(parents=True)
    with JsonlSink(run_dir / "metrics.jsonl") as sink:
        for step in range(1, 7):
            metrics = {"env/reward_mean": reward_slope * step, "objective/kl": kl_final * step / 6,
                       "objective/entropy": 2.0 - 0.1 * step, "tokens/response_len_mean": 10 + step}
            if value_loss:
                metrics["ppo/loss/value"] = 1.0 / step
            sink.log(metrics, step)
    if config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


BASE = {"algorithm": "ppo", "learning_rate": 1e-5, "seed": 0, "output_dir": "x"}


def test_runs_share_axes_and_the_page_tables_summaries_and_config_differences(tmp_path, monkeypatch, capsys):
    a = fake_run(tmp_path / "a" / "run", 0.1, 4.0, BASE)
    b = fake_run(tmp_path / "b" / "run", 0.05, 12.0, {**BASE, "learning_rate": 3e-5, "output_dir": "y"})
    c = fake_run(tmp_path / "grpo", 0.2, 1.0, {**BASE, "algorithm": "grpo"}, value_loss=False)
    lines = []
    original = plots._line
    monkeypatch.setattr(plots, "_line", lambda axes, series, label: (
        lines.append((axes.get_title(), label, list(series.steps))), original(axes, series, label)))
    out = tmp_path / "cmp" / "report.html"
    assert main(["report", str(a), str(b), str(c), "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    labels = ["a/run", "b/run", "grpo"]  # the same folder name told apart by its parent
    for plot in PLOTS:
        drawn = [(label, steps) for title, label, steps in lines if title == plot.title]
        expected = labels if plot.key != "ppo/loss/value" else labels[:2]  # grpo logged no value loss
        assert drawn == [(label, list(range(1, 7))) for label in expected], plot.key
        png = out.parent / ("compare_" + plot.key.replace("/", "_") + ".png")
        assert png.read_bytes()[:8] == PNG_MAGIC
    page = out.read_text()
    for label in labels:
        assert f"<th>{label}</th>" in page
    assert page.count('src="compare_') == len(PLOTS)
    # summaries per run: the last-3 reward means and the KL verdict (b leaves the [0, 10] band)
    assert "<td>0.5</td>" in page and "<td>0.25</td>" in page and "<td>1</td>" in page
    assert page.count('class="good">yes, all 6 steps') == 2 and 'class="bad">no, 1 of 6 steps' in page
    # config differences: learning_rate and algorithm, not seed, not output_dir
    assert "<code>learning_rate</code>" in page and "<code>algorithm</code>" in page
    assert "<code>seed</code>" not in page and "<code>output_dir</code>" not in page


def test_default_output_is_under_the_first_run_and_the_single_run_report_still_works(tmp_path):
    a = fake_run(tmp_path / "base", 0.1, 4.0, BASE)
    b = fake_run(tmp_path / "change", 0.2, 4.0, None)
    assert main(["report", str(a), str(b)]) == 0
    page = (a / "compare" / "report.html").read_text()
    assert "<code>learning_rate</code>" not in page  # one config only: nothing to set against it
    assert main(["report", str(a)]) == 0
    assert (a / "report" / "report.html").is_file() and (a / "report" / "env_reward_mean.png").is_file()


def test_a_missing_run_is_named(tmp_path, capsys):
    a = fake_run(tmp_path / "base", 0.1, 4.0, BASE)
    assert main(["report", str(a), str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["report", str(a), str(a), "--output", str(tmp_path / "x.png")]) == 2
    assert compare.run_labels([a, a]) == ["base (1)", "base (2)"]
