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


@pytest.mark.parametrize("command, algorithm", [("grpo", "grpo"), ("rloo", "rloo"), ("reinforce-pp", "reinforce++")])
def test_critic_free_commands_take_the_same_keys(command, algorithm, model_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main([command, "--model", str(model_dir), "--prompts", str(prompt_file), "--reward",
                 "rewards_for_tests:count_good", "--output_dir", str(out), *SMALL, "--num_generations", "2",
                 "--kl_in_loss", "true"])
    assert code == 0, capsys.readouterr().err
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["algorithm"], resolved["num_generations"], resolved["kl_in_loss"]) == (algorithm, 2, True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "ppo/loss/kl" in rows[-1] and "ppo/val/var_explained" not in rows[-1]
    AutoModelForCausalLM.from_pretrained(out / "policy")


def test_command_and_config_algorithm_must_agree(model_dir, prompt_file, tmp_path, capsys):
    (tmp_path / "rloo.yaml").write_text(yaml.safe_dump({"algorithm": "rloo", "model": str(model_dir)}))
    assert main(["grpo", "--config", str(tmp_path / "rloo.yaml")]) == 2
    assert "`tether grpo` runs algorithm='grpo', but the config sets algorithm='rloo'; use `tether rloo`" in \
        capsys.readouterr().err


def test_grpo_help_lists_its_keys(capsys):
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    text = capsys.readouterr().out
    assert "--num_generations" in text and "--kl_in_loss" in text and "--lora_r" in text


@pytest.mark.parametrize("example", ["grpo_sentiment", "rloo_sentiment", "reinforce_pp_sentiment"])
def test_method_examples_are_valid_configs(example):
    from pathlib import Path

    from tether.cli import build_parser, config_from_args

    path = Path(__file__).parents[1] / "examples" / f"{example}.yaml"
    args = build_parser().parse_args(["demo", "--config", str(path)])
    config = config_from_args(args.demo, "demo")
    assert config.algorithm == yaml.safe_load(path.read_text())["algorithm"]
    assert config.batch_size % config.num_generations == 0
