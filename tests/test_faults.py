"""Numerical faults skip the update without touching the weights, are counted, and halt a run that keeps failing."""

import pytest
import torch
from conftest import make_model, make_tokenizer

import tether.trainers.optimise as optimise_module
from tether import PPOConfig
from tether.trainers.guards import TrainingHalted
from tether.trainers import PPOTrainer

PROMPTS = ["the movie was", "i really", "a story", "we"]


def make_trainer(tmp_path, **overrides):
    tok = make_tokenizer()
    cfg = PPOConfig(**{"batch_size": 4, "minibatch_size": 2, "ppo_epochs": 2, "max_new_tokens": 6,
                       "learning_rate": 1e-2, "output_dir": str(tmp_path), **overrides})
    return PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.policy.state_dict().items()}


def unchanged(before, trainer):
    return all(torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())


def test_nan_loss_skips_every_update_then_halts(tmp_path, monkeypatch):
    real = optimise_module.policy_loss
    monkeypatch.setattr(optimise_module, "policy_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    t = make_trainer(tmp_path, max_faults_in_row=2)
    before = weights(t)
    gen = t.generate(PROMPTS)
    stats = t.step(gen.queries, gen.responses, [1.0, 0.0, 0.5, 0.2])
    assert stats["faults/skipped_minibatches"] == 4 and stats["faults/skipped_steps"] == 1
    assert unchanged(before, t)
    with pytest.raises(TrainingHalted, match="2 steps in a row had updates skipped .* loss or gradient was nan/inf"):
        t.step(gen.queries, gen.responses, [1.0, 0.0, 0.5, 0.2])
    assert unchanged(before, t)


def test_nan_gradient_skips_the_update(tmp_path):
    t = make_trainer(tmp_path)
    before = weights(t)
    t.policy.value_head.weight.register_hook(lambda grad: grad * float("nan"))
    gen = t.generate(PROMPTS)
    stats = t.step(gen.queries, gen.responses, [1.0, 0.0, 0.5, 0.2])
    assert stats["faults/skipped_minibatches"] == 4
    assert unchanged(before, t)


def test_a_good_step_resets_the_fault_count(tmp_path):
    t = make_trainer(tmp_path, max_faults_in_row=2)
    gen = t.generate(PROMPTS)
    with pytest.warns(UserWarning, match="skipped"):
        t.step(gen.queries, gen.responses, [float("nan")] * 4)
    t.step(gen.queries, gen.responses, [1.0, 0.0, 0.5, 0.2])
    with pytest.warns(UserWarning, match="skipped"):
        t.step(gen.queries, gen.responses, [float("inf")] * 4)  # one in a row again: no halt
    assert t.faults.in_row == 1 and t.faults.skipped_steps == 2


def test_ratio_guard_skips_minibatches_that_moved_too_far(tmp_path):
    strict = make_trainer(tmp_path / "a", ratio_threshold=1.0 + 1e-9, learning_rate=5e-2, ppo_epochs=4)
    gen = strict.generate(PROMPTS)
    stats = strict.step(gen.queries, gen.responses, [1.0, 0.0, 0.5, 0.2])
    assert stats["ppo/skipped_ratio_minibatches"] > 0
    default = make_trainer(tmp_path / "b")
    gen = default.generate(PROMPTS)
    assert default.step(gen.queries, gen.responses, [1.0, 0.0, 0.5, 0.2])["ppo/skipped_ratio_minibatches"] == 0
