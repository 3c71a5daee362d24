"""The run report and the sinks that feed it: synthetic run folders, no training."""

import json
import math

import numpy as np
import pytest
import torch

from tether.report import build_report
from tether.report.plots import PLOTS
from tether.report.runfiles import read_metrics
from tether.report.sinks import JsonlSink, SamplesSink
from tether.report.trackers import Settings, Trackers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE = '<script>alert("x")</script> & friends'


def fake_run(run_dir, steps=8, samples=True):
    """A run whose reward climbs 0.1 -> 0.8 and whose KL leaves the band once, at step 6."""
    with JsonlSink(run_dir / "metrics.jsonl") as sink:
        for step in range(1, steps + 1):
            metrics = {
                "env/reward_mean": 0.1 * step,
                "env/reward_std": torch.tensor(0.05),  # tensors and numpy scalars become floats
                "objective/kl": np.float32(12.5 if step == 6 else 0.5 * step),
                "objective/entropy": 2.0 - 0.1 * step,
                "tokens/response_len_mean": 10 + step,
                "ppo/loss/value": math.nan if step == 2 else 1.0 / step,
            }
            if step == 3:
                del metrics["objective/entropy"]  # keys may come and go
            sink.log(metrics, step)
    if samples:
        with SamplesSink(run_dir / "samples.jsonl") as sink:
            for step in (1, 4, 8):
                sink.log([{"prompt": f"{HOSTILE} p{step}", "completion": f"done {step}", "score": 0.25 * step,
                           "kl": 0.125}], step)
    return run_dir


def test_report_writes_valid_pngs_and_summary(tmp_path):
    page = build_report(fake_run(tmp_path / "my-run"))
    assert page == tmp_path / "my-run" / "report" / "report.html"
    pngs = sorted((page.parent).glob("*.png"))
    assert len(pngs) == len(PLOTS)
    import matplotlib.image

    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(png).shape[:2] == (400, 700)  # 7 x 4 inches at 100 dpi
    html = page.read_text(encoding="utf-8")
    assert "my-run" in html
    for png in pngs:
        assert f'src="{png.name}"' in html  # relative, so the folder can be moved or zipped
    # first-3 mean 0.2, last-3 mean 0.7, change +0.5; final KL 4; step 6 outside [0, 10].
    assert "<td>0.2</td>" in html and "<td>0.7</td>" in html and "<td>+0.5</td>" in html
    assert "<td>4</td>" in html
    assert "1 of 8 steps outside (step 6: 12.5)" in html


def test_report_escapes_samples_and_shows_first_and_last_step(tmp_path):
    html = build_report(fake_run(tmp_path)).read_text(encoding="utf-8")
    assert HOSTILE not in html and "<script>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; friends p1" in html
    assert "p8" in html and "done 8" in html
    assert "p4" not in html  # only the first and the last sampled step


def test_report_without_samples_says_so(tmp_path):
    run = fake_run(tmp_path, samples=False)
    assert "No samples were logged" in build_report(run).read_text(encoding="utf-8")
    (run / "samples.jsonl").write_text("")
    assert "No samples were logged" in build_report(run).read_text(encoding="utf-8")


def test_missing_plot_metric_is_noted_not_drawn(tmp_path):
    with JsonlSink(tmp_path / "metrics.jsonl") as sink:
        sink.log({"env/reward_mean": 1.0, "objective/kl": 0.1}, 1)
    html = build_report(tmp_path).read_text(encoding="utf-8")
    assert "<code>ppo/loss/value</code> was not logged" in html
    assert not (tmp_path / "report" / "ppo_loss_value.png").exists()


def test_missing_metrics_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        build_report(tmp_path)


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", '{"step": "3", "x": 1}', '{"x": 1}'])
def test_malformed_metrics_line_is_named(tmp_path, bad):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "x": 1.0}\n\n' + bad + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3"):
        build_report(tmp_path)


def test_jsonl_sink_writes_nan_as_null_and_reader_skips_it(tmp_path):
    with JsonlSink(tmp_path / "m.jsonl") as sink:
        sink.log({"a": math.nan, "b": torch.tensor([2.5]), "c": np.int64(3)}, 7)
        with pytest.raises(ValueError, match="reserved"):
            sink.log({"step": 1.0}, 8)
        with pytest.raises(ValueError, match="single number"):
            sink.log({"v": torch.ones(3)}, 8)
    line = (tmp_path / "m.jsonl").read_text()
    assert json.loads(line) == {"step": 7, "a": None, "b": 2.5, "c": 3.0}
    series = read_metrics(tmp_path / "m.jsonl")
    assert "a" not in series and series["b"].steps == [7] and series["b"].values == [2.5]


def test_samples_sink_format(tmp_path):
    with SamplesSink(tmp_path / "s.jsonl") as sink:
        sink.log([{"prompt": "p", "completion": "c", "score": torch.tensor(0.5), "kl": math.inf}], 2)
        with pytest.raises(KeyError, match="completion"):
            sink.log([{"prompt": "p"}], 3)
    row = json.loads((tmp_path / "s.jsonl").read_text())
    assert row == {"step": 2, "prompt": "p", "completion": "c", "score": 0.5, "kl": None}


def test_tensorboard_tracker_round_trip(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = Trackers.start(["tensorboard"], Settings(tmp_path, "p", "r", (), None, 0), {"seed": 0, "tags": ["a"]})
    for step in range(1, 4):
        sink.log({"env/reward_mean": torch.tensor(0.5 * step), "objective/kl": math.nan}, step)
    sink.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["env/reward_mean"]  # the NaN-only metric was skipped
    scalars = events.Scalars("env/reward_mean")
    assert [e.step for e in scalars] == [1, 2, 3]
    assert [e.value for e in scalars] == pytest.approx([0.5, 1.0, 1.5])
