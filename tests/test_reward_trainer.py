"""A tiny reward model learns a synthetic preference; what it saves loads in transformers and as a PPO reward."""

import json
import random

import pytest
import torch
import yaml
from conftest import make_tokenizer
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from tether.cli import main
from tether.rewards import RewardModel, resolve_reward
from tether.reward_config import RewardConfig
from tether.trainers.reward import RewardTrainer

POSITIVE, NEGATIVE = ["good", "great", "fun", "fine"], ["bad", "awful", "dull"]
NEUTRAL = "the a movie film plot actor scene story music i you we it was is and so very really quite".split()


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """The same random sentence with one positive word (chosen) or one negative word (rejected) inserted."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        base = [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 7))]
        k = rng.randint(0, len(base))
        rows.append({"prompt": "the movie was",
                     "chosen": " " + " ".join(base[:k] + [rng.choice(POSITIVE)] + base[k:]),
                     "rejected": " " + " ".join(base[:k] + [rng.choice(NEGATIVE)] + base[k:])})
    return rows


def tiny_reward_model(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=32, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2ForSequenceClassification(config)


def config(tmp_path, **overrides):
    return RewardConfig(**{"output_dir": str(tmp_path / "rm"), "epochs": 3, "batch_size": 16, "learning_rate": 3e-3,
                           "lr_scheduler_type": "constant", "max_length": 32, **overrides})


def test_tiny_reward_model_learns_a_synthetic_preference(tmp_path):
    tok = make_tokenizer()
    trainer = RewardTrainer(config(tmp_path), model=tiny_reward_model(tok), tokenizer=tok,
                            data=synthetic_pairs(256, seed=0), eval_data=synthetic_pairs(100, seed=1))
    before = trainer.evaluate()["eval/accuracy"]
    history = trainer.train()
    assert before < 0.7  # the random head does not already know
    assert history[-1]["eval/accuracy"] > 0.9 and history[-1]["eval/margin_mean"] > 1.0

    out = tmp_path / "rm"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/accuracy", "train/margin_mean"} <= rows[0].keys()
    assert sum("eval/accuracy" in r for r in rows) == 3  # once per epoch
    assert yaml.safe_load((out / "reward_config.yaml").read_text())["epochs"] == 3

    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1
    reward = resolve_reward(str(out))
    assert isinstance(reward, RewardModel)
    held_out = synthetic_pairs(50, seed=2)
    prompts = [r["prompt"] for r in held_out]
    chosen = reward(prompts, [r["chosen"] for r in held_out])
    rejected = reward(prompts, [r["rejected"] for r in held_out])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(held_out) > 0.9


def labelled(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(NEUTRAL) for _ in range(4)] + [rng.choice(POSITIVE + NEGATIVE) for _ in range(2)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": float(sum(w in POSITIVE for w in words))})
    return rows


def test_labelled_texts_train_pairwise_by_pairing_and_regression_directly(tmp_path):
    tok = make_tokenizer()
    pairwise = RewardTrainer(config(tmp_path, eval_fraction=0.25), model=tiny_reward_model(tok), tokenizer=tok,
                             data=labelled(200, 0))
    assert len(pairwise.train_set) > 100 and len(pairwise.eval_set) > 30
    train_texts = set(pairwise.train_set.chosen + pairwise.train_set.rejected)
    assert not train_texts & set(pairwise.eval_set.chosen + pairwise.eval_set.rejected)  # split before pairing
    assert pairwise.train()[-1]["eval/accuracy"] > 0.85

    regression = RewardTrainer(config(tmp_path / "regression", objective="regression", epochs=6), model=tiny_reward_model(tok),
                               tokenizer=tok, data=labelled(200, 0), eval_data=labelled(60, 1))
    last = regression.train()[-1]
    assert last["eval/pearson"] > 0.9 and last["eval/mse"] < 0.2


def test_tether_reward_command_from_yaml(tmp_path, capsys):
    tok = make_tokenizer()
    backbone = tmp_path / "backbone"
    tiny_reward_model(tok).save_pretrained(backbone)
    tok.save_pretrained(backbone)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(64, 0)))
    cfg = tmp_path / "reward.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(backbone), "data": str(data), "epochs": 1, "batch_size": 16,
                                   "output_dir": str(tmp_path / "out"), "margin": 0.5, "eval_fraction": 0.25}))
    assert main(["reward", "--config", str(cfg), "--learning_rate", "1e-3"]) == 0
    assert "eval/accuracy" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "out" / "reward_config.yaml").read_text())["learning_rate"] == 1e-3
    RewardModel(str(tmp_path / "out"))


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        RewardConfig(epochs=0, eval_fraction=1.0, objective="regression", margin=1.0, lr_scheduler_type="nope")
    message = str(err.value)
    for part in ("epochs=0", "eval_fraction=1.0", "margin=1.0 only applies", "lr_scheduler_type='nope'"):
        assert part in message


def test_keep_freed_memory_is_applied_on_the_cpu_unless_switched_off(tmp_path, monkeypatch):
    from tether.trainers import reward

    applied = []
    monkeypatch.setattr(reward, "keep_freed_memory", lambda: applied.append(True))
    tok = make_tokenizer()
    for keep in (False, True):
        RewardTrainer(config(tmp_path, device="cpu", keep_freed_memory=keep), model=tiny_reward_model(tok),
                      tokenizer=tok, data=synthetic_pairs(32, seed=0))
        assert applied == ([True] if keep else [])
