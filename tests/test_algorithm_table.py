"""A method is one entry of tether.algorithms: registering one is all it takes to train it through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tether import PPOConfig
from tether.algorithms import ALGORITHMS
from tether.cli import algorithm_commands, build_parser

# A toy method, registered in the subprocess the way a user's own module would: advantage = score minus the
# batch mean, on every token; no critic.
SCRIPT = '''
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import make_model, make_tokenizer
from tether.algorithms import Algorithm, register

def mean_baseline(batch, scores, kl_coef, config, all_reduce):
    non_score = -kl_coef * batch.kl * batch.mask
    reward = scores + non_score.sum(-1)
    return (reward - reward.mean())[:, None] * batch.mask, None, non_score

register(Algorithm("mean-baseline", "mean-baseline", "score minus the batch mean", "A toy critic-free method.",
                   mean_baseline, defaults={{"num_generations": 1, "kl_in_loss": False, "whiten_advantages": False}}))
tok = make_tokenizer()
model = make_model(len(tok))
tok.save_pretrained({model_dir!r}); model.save_pretrained({model_dir!r})
from tether.cli import main
sys.exit(main(["mean-baseline", "--model", {model_dir!r}, "--prompts", {prompts!r}, "--reward",
               "rewards_for_tests:count_good", "--output_dir", {out!r}, "--steps", "3", "--batch_size", "8",
               "--minibatch_size", "4", "--max_new_tokens", "4", "--learning_rate", "1e-3"]))
'''


def test_a_registered_method_trains_through_its_own_subcommand(tmp_path):
    tests = str(Path(__file__).parent)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie was", "i really", "a story"]))
    script = SCRIPT.format(tests=tests, model_dir=str(tmp_path / "model"), prompts=str(prompts),
                           out=str(tmp_path / "run"))
    done = subprocess.run([sys.executable, "-c", script], cwd=tests, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert "ppo/loss/value" not in lines[-1]  # no critic
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "algorithm: mean-baseline" in config
    assert (tmp_path / "run" / "policy" / "config.json").exists()


def test_the_table_drives_the_config_and_the_cli():
    assert set(ALGORITHMS) == {"ppo", "grpo", "rloo", "reinforce++"}  # the subprocess's entry stayed there
    assert algorithm_commands() == {"ppo": "ppo", "grpo": "grpo", "rloo": "rloo", "reinforce-pp": "reinforce++"}
    subcommands = build_parser()._subcommands_action.choices
    assert set(algorithm_commands()) <= set(subcommands)
    with pytest.raises(ValueError, match=r"algorithm='toy' is not one of \['grpo', 'ppo', 'reinforce\+\+', 'rloo'\]"):
        PPOConfig(algorithm="toy")


def test_register_refuses_a_taken_name_or_command():
    from tether.algorithms import Algorithm, register

    ppo = ALGORITHMS["ppo"]
    with pytest.raises(ValueError, match=r"algorithm 'ppo' \(command 'ppo'\): the name or the command is taken"):
        register(ppo)
    with pytest.raises(ValueError, match="the name or the command is taken"):
        register(Algorithm("other", "demo", "h", "d", ppo.advantages, defaults=ppo.defaults))
    assert set(ALGORITHMS) == {"ppo", "grpo", "rloo", "reinforce++"}


def test_num_generations_of_zero_is_one_error_not_two():
    with pytest.raises(ValueError) as err:
        PPOConfig(num_generations=0)
    assert "num_generations=0 must be > 0" in str(err.value) and "compares completions" not in str(err.value)
