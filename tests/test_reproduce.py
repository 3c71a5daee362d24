"""A run folder's config.yaml names everything the run used, and `tether ppo --config RUN/config.yaml` repeats it."""

import json

import pytest
import yaml
from conftest import make_model, make_tokenizer

from tether.cli import main
from tether.data import load_prompts
from tether.demo import movie_review_openings


def metrics(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


def test_the_demo_config_names_its_prompts_and_reward_and_reproduces_the_run(tmp_path):
    pytest.importorskip("vaderSentiment")
    tok = make_tokenizer()
    model_dir = tmp_path / "tiny"
    make_model(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["demo", "--model", str(model_dir), "--output_dir", str(first), "--steps", "3", "--batch_size", "4",
                 "--minibatch_size", "2", "--max_new_tokens", "5", "--report_to", "none"]) == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["prompts"] == "tether.demo:movie_review_openings" and saved["reward"] == "tether.demo:vader_reward"
    assert saved["model"] == str(model_dir)

    assert main(["ppo", "--config", str(first / "config.yaml"), "--output_dir", str(again)]) == 0
    a, b = metrics(first), metrics(again)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert any(r["env/reward_mean"] != 0 for r in a)  # VADER scored something: the comparison has content
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], abs=1e-6, nan_ok=True), (x["step"], key)
    assert yaml.safe_load((again / "config.yaml").read_text()) == {**saved, "output_dir": str(again)}


def test_prompts_by_importable_name(tmp_path):
    assert load_prompts("tether.demo:movie_review_openings") == movie_review_openings()
    with pytest.raises(ValueError, match="cannot import 'tether.nowhere'"):
        load_prompts("tether.nowhere:prompts")
    with pytest.raises(ValueError, match="has no function 'no_such'"):
        load_prompts("tether.demo:no_such")
    with pytest.raises(TypeError, match="prompts 'tether.demo:vader_reward'"):  # called with no arguments
        load_prompts("tether.demo:vader_reward")
