"""A tiny random GPT-2 must learn a synthetic reward with PPO, KL bounded. Sized to run in well under a minute."""

import json

import torch
from conftest import make_model, make_tokenizer

from tether import PPOConfig
from tether.trainers import PPOTrainer

PROMPTS = ["the movie was", "i really", "a story", "the actor and", "we", "it is not", "the plot was very",
           "music"]


def share_of(word_id: int, tokenizer):
    def reward(prompts, completions):
        out = []
        for text in completions:
            ids = tokenizer(text)["input_ids"] or [None]
            out.append(sum(i == word_id for i in ids) / len(ids))
        return out
    return reward


def train_toward_good(algorithm: str, tmp_path, **keys) -> tuple[list[dict], object]:
    """A tiny GPT-2 trained on PROMPTS toward the share of the word "good" (about 0.05 at the start)."""
    from tether.trainers import trainer_class

    tok = make_tokenizer()
    keys = {"steps": 30, "batch_size": 16, "minibatch_size": 8, "ppo_epochs": 4, "max_new_tokens": 8, "seed": 0,
            **keys}
    cfg = PPOConfig(algorithm=algorithm, output_dir=str(tmp_path), **keys)
    trainer = trainer_class(algorithm)(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=PROMPTS,
                                       reward=share_of(tok.convert_tokens_to_ids("good"), tok))
    return trainer.train(), trainer


def assert_learned_with_kl_bounded(history: list[dict], gain: float = 0.15) -> None:
    """Mean reward of the last 5 steps above the first 5 by `gain`; objective/kl at most 10 at every step and above
    0 at the end (it is exact, >= 0 by construction: it moved, and stayed bounded)."""
    rewards = [h["env/reward_mean"] for h in history]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + gain, rewards
    kls = [h["objective/kl"] for h in history]
    assert max(kls) <= 10 and kls[-1] > 0, kls


def test_tiny_gpt2_learns_share_of_target_token(tmp_path):
    tok = make_tokenizer()
    target = tok.convert_tokens_to_ids("good")
    cfg = PPOConfig(steps=30, batch_size=16, minibatch_size=8, ppo_epochs=4, learning_rate=3e-3,
                    max_new_tokens=8, init_kl_coef=0.05, seed=0, output_dir=str(tmp_path / "run"))
    trainer = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=PROMPTS,
                         reward=share_of(target, tok))
    history = trainer.train()
    rewards = [h["env/reward_mean"] for h in history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.25, rewards  # random start: ~1/34 share of 'good'
    kls = [h["objective/kl"] for h in history]
    assert max(kls) <= 10 and kls[-1] > 0, kls  # objective/kl is exact (>= 0 by construction): it moved, bounded
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 31))
    assert (tmp_path / "run" / "policy" / "config.json").exists()


def test_first_update_starts_from_ratio_one(tmp_path):
    """Old log-probs are the policy's own at rollout time: before any update the ratio is exactly 1."""
    tok = make_tokenizer()
    cfg = PPOConfig(batch_size=8, minibatch_size=8, ppo_epochs=1, max_new_tokens=8, top_k=6, top_p=0.9,
                    min_new_tokens=2, repetition_penalty=1.2, output_dir=str(tmp_path))
    trainer = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)
    gen = trainer.generate(PROMPTS)
    stats = trainer.step(gen.queries, gen.responses, [float(i) for i in range(8)])
    assert abs(stats["ppo/policy/ratio_mean"] - 1) < 1e-5
    assert stats["ppo/policy/clipfrac"] == 0 and stats["ppo/policy/approxkl"] < 1e-10


def test_same_seed_same_run(tmp_path):
    tok = make_tokenizer()
    target = tok.convert_tokens_to_ids("good")

    def run(name):
        cfg = PPOConfig(steps=3, batch_size=8, minibatch_size=4, max_new_tokens=6, top_k=8, seed=7,
                        output_dir=str(tmp_path / name))
        trainer = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=PROMPTS,
                             reward=share_of(target, tok))
        return [{k: v for k, v in h.items() if not k.startswith(("time/", "throughput/"))} for h in trainer.train()]

    assert run("a") == run("b")


def test_gradient_accumulation_equals_one_big_minibatch(tmp_path):
    """minibatch 8 in one pass == minibatch 8 as 2 micro-batches of 4: same gradient, same weights."""
    tok = make_tokenizer()
    trainers = []
    for gas in (1, 2):
        cfg = PPOConfig(batch_size=8, minibatch_size=8, gradient_accumulation_steps=gas, ppo_epochs=1,
                        max_new_tokens=8, learning_rate=1e-3, output_dir=str(tmp_path / str(gas)))
        trainers.append(PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok))
    gen = trainers[0].generate(PROMPTS)  # responses of different lengths -> different token shares
    scores = [float(i % 3) for i in range(8)]
    stats = [t.step(gen.queries, gen.responses, scores) for t in trainers]
    assert abs(stats[0]["ppo/loss/policy"] - stats[1]["ppo/loss/policy"]) < 1e-6
    assert abs(stats[0]["ppo/loss/value"] - stats[1]["ppo/loss/value"]) < 1e-6
    for (name, a), b in zip(trainers[0].policy.named_parameters(), trainers[1].policy.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
