"""Verifiable rewards by hand, reward specs that name and log each function, and the offline reasoning example."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_model, make_tokenizer

from tether.rewards import RewardError, resolve_reward, score_batch
from tether.rewards.verifiable import exact_match, extract_answer, format_reward, math_answer, numeric_answer

ROOT = Path(__file__).parents[1]

CASES = [  # completion, reference, exact_match, numeric_answer, format_reward
    ("<answer>7</answer>", "7", 1, 1, 1),
    ("I think so. <answer> 7 </answer>", 7, 1, 1, 1),
    ("The answer is 7.", "7", 0, 1, 0),  # no tags: the whole text for exact_match, its last number for numeric
    ("7.", "7", 1, 1, 0),
    ("<answer>8</answer>", "7", 0, 0, 1),  # wrong
    ("<answer>7</answer> and more", "7", 1, 1, 0),  # text after the block
    ("<answer>7</answer><answer>7</answer>", "7", 1, 1, 0),  # two blocks
    ("<answer></answer>", "7", 0, 0, 0),  # empty block
    ("<answer>7", "7", 0, 1, 0),  # malformed: unclosed tag
    ("", "7", 0, 0, 0),  # empty completion
    ("1,000", "1000", 0, 1, 0),
    ("-3", "-3", 1, 1, 0),
    ("<answer>Paris</answer>", "paris", 1, None, 1),
]


@pytest.mark.parametrize("completion, reference, exact, numeric, fmt", CASES)
def test_verifiers_by_hand(completion, reference, exact, numeric, fmt):
    assert exact_match([""], [completion], [reference]) == [float(exact)]
    assert format_reward([""], [completion]) == [float(fmt)]
    if numeric is not None:
        assert numeric_answer([""], [completion], [reference]) == [float(numeric)]


def test_extract_answer_takes_the_last_block_else_the_text():
    assert extract_answer("a <answer>1</answer> b <answer> 2 </answer>") == "2"
    assert extract_answer("  plain  ") == "plain"


def test_math_answer_by_hand():
    completions = ["<answer>0.5</answer>", "$\\frac{1}{2}$", "<answer>1/3</answer>", "", "<answer>}{</answer>"]
    assert math_answer([""] * 5, completions, ["\\frac{1}{2}"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert math_answer([""], ["The result is $\\boxed{2x+2}$"], ["2(x+1)"]) == [1.0]


def test_math_answer_without_math_verify_is_refused_at_set_up(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify now raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'tether\[reasoning\]'"):
        resolve_reward("tether.rewards.verifiable:math_answer")
    assert resolve_reward("tether.rewards.verifiable:numeric_answer") is numeric_answer  # the others need nothing


def test_a_missing_or_non_numeric_answer_names_the_completion():
    with pytest.raises(RewardError, match=r"no reference answer .* on completion 1\. Prompt: 'q1'"):
        score_batch(exact_match, ["q0", "q1"], ["a", "b"], {"answer": ["a", None]})
    with pytest.raises(RewardError, match=r"'seven' is not a number on completion 1\."):
        score_batch(numeric_answer, ["q0", "q1"], ["1", "2"], {"answer": [1, "seven"]})


def test_a_reward_spec_names_each_function_and_hands_each_the_columns_it_takes(tmp_path):
    spec = tmp_path / "r.yaml"
    spec.write_text(yaml.safe_dump({"components": [
        {"reward": "tether.rewards.verifiable:numeric_answer", "weight": 1.0},
        {"reward": "tether.rewards.verifiable:format_reward", "weight": 0.5, "name": "format"},
        {"reward": "tether.rewards.verifiable:numeric_answer", "weight": 0.25, "clip": 0.5}]}))
    reward = resolve_reward(str(spec))
    assert reward.names == ["numeric_answer", "format", "numeric_answer_2"]
    completions = ["<answer>3</answer>", "3", "<answer>4</answer>"]
    scores = score_batch(reward, ["p"] * 3, completions, {"answer": ["3", "3", "3"], "ended": [True] * 3})
    assert scores.tolist() == [1.0 + 0.5 + 0.125, 1.0 + 0.125, 0.5]
    assert {k: v.tolist() for k, v in reward.parts.items()} == {
        "numeric_answer": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0], "numeric_answer_2": [0.5, 0.5, 0.0]}


@pytest.mark.parametrize("component, message", [
    ({"reward": "a:b", "name": "has space"}, "name='has space' must be letters"),
])
def test_bad_component_names_are_refused(tmp_path, component, message):
    spec = tmp_path / "r.yaml"
    spec.write_text(yaml.safe_dump({"components": [component]}))
    with pytest.raises(ValueError, match=message):
        resolve_reward(str(spec))


def test_per_function_means_are_logged_every_step(tmp_path):
    from tether import PPOConfig
    from tether.trainers import GRPOTrainer

    spec = tmp_path / "r.yaml"
    spec.write_text(yaml.safe_dump({"components": [
        {"reward": "tether.rewards.verifiable:exact_match", "name": "correct"},
        {"reward": "tether.rewards.verifiable:format_reward", "weight": 0.5}]}))
    tok = make_tokenizer()
    rows = [{"prompt": "the movie was", "answer": "good"}, {"prompt": "i really", "answer": "bad"}]
    cfg = PPOConfig(algorithm="grpo", steps=2, batch_size=4, num_generations=2, minibatch_size=4, ppo_epochs=1,
                    max_new_tokens=1, output_dir=str(tmp_path / "run"), report_to=["none"])
    trainer = GRPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=rows, reward=str(spec))
    seen = []
    original = trainer.generate
    trainer.generate = lambda queries: seen.append(original(queries)) or seen[-1]
    history = trainer.train()
    answer_of = {r["prompt"]: r["answer"] for r in rows}
    for h, gen in zip(history, seen):
        answers = [answer_of[tok.decode(q)] for q in gen.queries]
        right = [float(t.strip() == a) for t, a in zip(gen.texts, answers)]
        assert h["env/reward/correct_mean"] == pytest.approx(sum(right) / 4)
        assert h["env/reward/format_reward_mean"] == 0.0  # no tags in one-word completions
        assert h["env/reward_mean"] == pytest.approx(sum(right) / 4)
    assert len(seen) == 2 and any(h["env/reward/correct_mean"] > 0 for h in history)  # the check can fail


def test_the_reasoning_prompts_hold_out_questions_and_agree_with_reasoning_gyms_verifier():
    import reasoning_gym  # the `reasoning` extra, which scripts/setup.sh installs

    from tether.reasoning import CHAIN_SUM, chain_sum_split, task_rows

    train, held_out = chain_sum_split()
    questions = lambda rows: {r["prompt"][-1]["content"] for r in rows}  # noqa: E731
    assert len(held_out) == 64 and not questions(train) & questions(held_out)
    # the committed files are what the script writes
    for name, rows in (("train", train), ("eval", held_out)):
        path = ROOT / "examples" / "data" / f"chain_sum_{name}.jsonl"
        assert [json.loads(x) for x in path.read_text().splitlines()] == rows
    config = {k: v for k, v in CHAIN_SUM.items() if k != "task"}
    dataset = reasoning_gym.create_dataset("chain_sum", size=20, seed=3, **config)
    rows = task_rows("chain_sum", size=20, seed=3, **config)
    for entry, row in zip(dataset, rows):
        for guess in (entry["answer"], str(int(entry["answer"]) + 1), f"It is {entry['answer']}."):
            theirs = dataset.score_answer(guess, entry) == 1.0
            ours = numeric_answer([""], [guess], [row["answer"]])[0] == 1.0
            assert ours == theirs or guess.startswith("It is")  # reasoning-gym wants the bare answer
        assert numeric_answer([""], [f"It is {entry['answer']}."], [row["answer"]]) == [1.0]


def test_the_reasoning_demo_end_to_end_on_a_tiny_model(tmp_path, capsys):
    """examples/chain_sum.yaml through `tether demo`, a tiny model in SmolLM2's place: the run folder's artifacts
    exist and parse, with the held-out evaluation before and after."""
    from tether.cli import main

    tok = make_tokenizer()
    model_dir = tmp_path / "tiny"
    make_model(len(tok), n_positions=128).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    code = main(["demo", "--config", str(ROOT / "examples" / "chain_sum.yaml"), "--model", str(model_dir),
                 "--chat_template", "chatml", "--steps", "2", "--batch_size", "8", "--num_generations", "4",
                 "--minibatch_size", "8", "--ppo_epochs", "1", "--max_new_tokens", "3", "--eval_every", "1",
                 "--output_dir", str(out), "--report_to", "none",
                 "--prompts", str(ROOT / "examples" / "data" / "chain_sum_train.jsonl"),
                 "--eval_prompts", str(ROOT / "examples" / "data" / "chain_sum_eval.jsonl")])
    assert code == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/reward_mean" in r] == [0, 1, 2]
    assert all("env/reward_mean" in r for r in records if r["step"] > 0)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].startswith("user: State the final answer") for s in samples)
    assert yaml.safe_load((out / "config.yaml").read_text())["reward"] == "tether.rewards.verifiable:numeric_answer"
    assert (out / "report" / "report.html").is_file() and (out / "report" / "eval_reward_mean.png").is_file()
    assert (out / "policy" / "config.json").is_file()
    assert "held-out eval/reward_mean (greedy): step 0:" in capsys.readouterr().out
