"""`tether inspect-reward`: scores of chosen texts, the distribution over a dataset, the prompt's share."""

import json

import pytest
import torch
from conftest import assert_close64

from tether.cli import main
from tether.report.reward_inspect import between_prompt_share, inspect_reward, prompt_r2, summarize


def test_prompt_r2_is_the_squared_correlation():
    r2, stats = prompt_r2(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0]))
    assert_close64(r2, 1.0)
    r2, stats = prompt_r2(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, -1.0, -1.0, 1.0]))
    assert_close64(r2, 0.0)  # orthogonal after centring
    r2, _ = prompt_r2(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert_close64(r2, 0.25)  # corr = 0.5 by hand: centred (-1, 1, 0) . (-1, 0, 1) / (sqrt 2 * sqrt 2)
    assert prompt_r2(torch.tensor([1.0, 2.0]), torch.tensor([5.0, 5.0]))[0] == 0.0


def test_between_prompt_share_by_hand():
    # prompt a: 1, 3 (mean 2); prompt b: 5, 7 (mean 6); grand mean 4
    # between = 2*(2-4)^2 + 2*(6-4)^2 = 16; total = 9 + 1 + 1 + 9 = 20
    share, stats = between_prompt_share(torch.tensor([1.0, 3.0, 5.0, 7.0]), ["a", "a", "b", "b"])
    assert_close64(share, 0.8)
    assert stats["prompts"] == 2
    assert between_prompt_share(torch.tensor([1.0, 2.0]), ["a", "b"])[0] is None


def test_summarize():
    s = summarize(torch.arange(101, dtype=torch.float32))
    assert s["count"] == 101 and s["median"] == 50 and s["p5"] == 5 and s["p95"] == 95 and s["max"] == 100


def prompt_heavy(prompts, completions):
    """The prompt decides most of the score: its length, plus a little for each 'good'."""
    return [len(p.split()) + 0.1 * c.split().count("good") for p, c in zip(prompts, completions)]


def test_inspect_reward_writes_a_record_and_a_histogram(tmp_path):
    data = tmp_path / "samples.jsonl"
    rows = [{"prompt": p, "completion": c} for p in ("a", "a b c", "a b c d e") for c in (" good", " bad", " good good")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = inspect_reward(prompt_heavy, texts=["good good", "bad"], data=str(data), output_dir=tmp_path / "out")
    assert [t["score"] for t in record["texts"]] == pytest.approx([0.2, 0.0])
    assert record["distribution"]["count"] == 9
    assert record["prompt_share"]["r2_of_prompt_alone"] > 0.95
    assert record["prompt_share"]["between_prompt_share"] > 0.95
    assert (tmp_path / "out" / "reward_histogram.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "reward_inspect.json").read_text())["prompt_share"]["prompts"] == 3


def test_inspect_reward_on_pairs_reports_accuracy(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p", "chosen": " good good", "rejected": " bad"}, {"prompt": "p", "chosen": " bad",
                                                                         "rejected": " good"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = inspect_reward(prompt_heavy, data=str(data), output_dir=tmp_path / "out")
    assert record["pairs"] == pytest.approx({"count": 2, "accuracy": 0.5, "margin_mean": 0.05}, abs=1e-6)  # diffs 0.2, -0.1


def test_inspect_reward_command(tmp_path, capsys):
    data = tmp_path / "texts.csv"
    data.write_text("text\nthe movie was good\nbad\n")
    code = main(["inspect-reward", "--reward", "test_reward_inspect:prompt_heavy", "--texts", "good", "bad bad",
                 "--data", str(data), "--output_dir", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    assert "+0.1000  'good'" in out and "distribution over 2 texts" in out
    assert main(["inspect-reward", "--reward", "test_reward_inspect:prompt_heavy"]) == 2
    assert "nothing to score" in capsys.readouterr().err
