"""`tether ppo` with flags and with YAML: the same flat keys, a real saved model folder, a real prompt file."""

import json

import pytest
import yaml
from conftest import make_model, make_tokenizer
from transformers import AutoModelForCausalLM

from tether.cli import main


@pytest.fixture
def model_dir(tmp_path):
    tok = make_tokenizer(pad=False)
    path = tmp_path / "tiny-gpt2"
    make_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie was", "i really", "a story"]))
    return path


SMALL = ["--steps", "2", "--batch_size", "4", "--minibatch_size", "2", "--max_new_tokens", "5"]


def test_ppo_from_flags(model_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["ppo", "--model", str(model_dir), "--prompts", str(prompt_file), "--reward",
                 "rewards_for_tests:count_good", "--output_dir", str(out), *SMALL, "--top_k", "4"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/policy", "ppo/val/var_explained",
            "tokens/response_len_mean", "time/step", "throughput/tokens_per_s"} <= rows[0].keys()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["top_k"] == 4 and resolved["batch_size"] == 4
    AutoModelForCausalLM.from_pretrained(out / "policy")  # loadable by transformers
    assert "done: 2 steps" in capsys.readouterr().out


def test_ppo_from_yaml_with_override(model_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    config = {"model": str(model_dir), "prompts": str(prompt_file), "reward": "rewards_for_tests:count_good",
              "output_dir": str(out), "steps": 1, "batch_size": 4, "minibatch_size": 2, "max_new_tokens": 5,
              "kl_estimator": "k3", "adaptive_kl": True}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["ppo", "--config", str(tmp_path / "run.yaml"), "--max_new_tokens", "3"]) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["kl_estimator"] == "k3" and resolved["max_new_tokens"] == 3 and resolved["adaptive_kl"] is True


def test_invalid_config_is_a_clear_error_not_a_traceback(model_dir, prompt_file, tmp_path, capsys):
    code = main(["ppo", "--model", str(model_dir), "--prompts", str(prompt_file), "--reward",
                 "rewards_for_tests:count_good", "--output_dir", str(tmp_path / "r"), "--batch_size", "6",
                 "--minibatch_size", "4"])
    assert code == 2
    assert "minibatch_size=4 does not divide batch_size=6" in capsys.readouterr().err


def test_unknown_model_path(tmp_path, prompt_file, capsys):
    code = main(["ppo", "--model", str(tmp_path / "missing"), "--prompts", str(prompt_file), "--reward",
                 "rewards_for_tests:count_good", "--output_dir", str(tmp_path / "r")])
    assert code == 2
    assert "missing" in capsys.readouterr().err
