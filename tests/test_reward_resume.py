"""`tether reward` checkpoints (safetensors + JSON, written atomically) and --resume continues exactly: a run
SIGKILLed mid-epoch and resumed ends with the weights and metrics of a straight run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer
from safetensors.torch import load_file
from test_reward_trainer import synthetic_pairs
from transformers import GPT2Config, GPT2ForSequenceClassification

from tether.reward_config import RewardConfig
from tether.trainers import reward_checkpoint
from tether.trainers.checkpoint import list_checkpoints
from tether.trainers.reward import RewardTrainer

TESTS = Path(__file__).parent
KILL_AT = 7  # of 8 steps (2 epochs x 4); checkpoints every 3: the resume starts at step 6, mid-epoch


def model(tok):
    """Dropout on, so the resumed run must also restore torch's global generator to match."""
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(GPT2Config(
        vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=32, num_labels=1,
        pad_token_id=tok.pad_token_id, bos_token_id=0, eos_token_id=0, resid_pdrop=0.1, embd_pdrop=0.1,
        attn_pdrop=0.1))


def trainer(out, **keys) -> RewardTrainer:
    tok = make_tokenizer()
    config = RewardConfig(**{"output_dir": str(out), "epochs": 2, "batch_size": 16, "learning_rate": 3e-3,
                             "max_length": 32, "lr_scheduler_type": "linear", "warmup_steps": 2, "checkpoint_every": 3,
                             "keep_checkpoints": 2, "eval_every": 3, "seed": 5, "report_to": ["none"], **keys})
    return RewardTrainer(config, model=model(tok), tokenizer=tok, data=synthetic_pairs(64, 0),
                         eval_data=synthetic_pairs(24, 1))


DRIVER = f"""
import os, signal, sys
sys.path[:0] = [{str(TESTS)!r}]
from test_reward_resume import trainer
from tether.trainers.reward import RewardTrainer
step = RewardTrainer._train_step
def killing_step(self, batch):
    if self.step_count + 1 == {KILL_AT}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs
    return step(self, batch)
RewardTrainer._train_step = killing_step
trainer(sys.argv[1]).train()
"""


def metrics(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_killed_mid_epoch_then_resumed_equals_a_straight_run(tmp_path):
    straight = tmp_path / "straight"
    straight_history = trainer(straight).train()

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(killed)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert [p.name for p in list_checkpoints(killed / "checkpoints")] == ["step-00000003", "step-00000006"]
    assert [r["step"] for r in metrics(killed)][-1] == KILL_AT - 1
    assert not (killed / "model.safetensors").exists()

    with pytest.raises(ValueError, match="pass --resume"):
        trainer(killed).train()
    with pytest.raises(ValueError, match="learning_rate: 0.003 -> 0.001"):
        RewardTrainer(RewardConfig(**{**trainer(killed).config.to_dict(), "learning_rate": 1e-3, "resume": True}),
                      model=model(make_tokenizer()), tokenizer=make_tokenizer(), data=synthetic_pairs(64, 0),
                      eval_data=synthetic_pairs(24, 1)).train()
    resumed_history = trainer(killed, resume=True).train()

    a, b = metrics(straight), metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], abs=1e-6), (x["step"], key)
    assert [r["step"] for r in resumed_history] == [r["step"] for r in straight_history] == [3, 4, 6, 8]
    for x, y in zip(straight_history, resumed_history):
        assert y == pytest.approx(x, abs=1e-6)
    final_a, final_b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], atol=1e-6, rtol=0)
    # and the weights moved: the comparison is not between two untouched models
    assert not torch.equal(final_a["score.weight"], model(make_tokenizer()).score.weight.detach())


def test_checkpoint_holds_no_pickle_and_resume_needs_one(tmp_path):
    out = tmp_path / "run"
    trainer(out, epochs=1, checkpoint_every=0).train()
    (only,) = list_checkpoints(out / "checkpoints")
    assert sorted(p.name for p in only.iterdir()) == sorted([reward_checkpoint.MODEL, reward_checkpoint.OPTIMIZER,
                                                             reward_checkpoint.RNG, reward_checkpoint.STATE])
    state = json.loads((only / reward_checkpoint.STATE).read_text())
    assert state["step"] == 4 and sorted(state["order"]) == list(range(64))
    assert any(k.endswith(".exp_avg") for k in load_file(only / reward_checkpoint.OPTIMIZER))
    assert trainer(out, epochs=1, resume="auto").train() == trainer(out, epochs=1, resume=True).train()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        trainer(tmp_path / "empty", resume=True).train()
