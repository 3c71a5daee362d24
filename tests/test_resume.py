"""Runs survive: SIGKILL at named points (tests/kill_driver.py), resume, and every step's metrics equal the
uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer
from safetensors.torch import load_file

from tether.cli import main
from tether.trainers import checkpoint as ckpt

TESTS = Path(__file__).parent
STEPS = 8


@pytest.fixture
def setup(tmp_path):
    tok = make_tokenizer()
    model_dir = tmp_path / "tiny"
    make_model(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie was", "i really", "a", "we"] * 3))
    args = ["ppo", "--model", str(model_dir), "--prompts", str(prompts), "--reward", "rewards_for_tests:count_good",
            "--steps", str(STEPS), "--batch_size", "4", "--minibatch_size", "2", "--max_new_tokens", "6",
            "--top_k", "8", "--learning_rate", "3e-3", "--checkpoint_every", "1", "--keep_checkpoints", "2",
            "--seed", "3", "--resume", "auto"]
    return args


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


def assert_checkpoints_readable(run: Path) -> None:
    for path in ckpt.list_checkpoints(run / "checkpoints"):
        load_file(path / ckpt.WEIGHTS)
        state = ckpt.read_state(path)
        assert state["step"] == ckpt.checkpoint_step(path)


# Adaptive KL and score normalisation: the controller's beta and the running score moments must be restored too.
STATEFUL = ["--reward", "rewards_for_tests:length", "--adaptive_kl", "true", "--kl_target", "0.05", "--kl_horizon",
            "40", "--score_norm", "true", "--ppo_epochs", "2"]
UPDATES_PER_STEP = 2 * 2  # ppo_epochs x batch_size / minibatch_size


def _killed_at(command: list[str], point: str, n: int, env: dict) -> None:
    proc = subprocess.run([sys.executable, str(TESTS / "kill_driver.py"), point, str(n), "--", *command], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-3000:])


def test_sigkill_at_named_points_then_resume_matches_uninterrupted(setup, tmp_path):
    """Killed while generating, right after an optimiser step, and half-way through writing a checkpoint (each at
    a named call, not after a wall-clock delay), then resumed: every step's metrics, the KL coefficient and the
    score moments among them, and the final weights equal the uninterrupted run's."""
    args = setup + STATEFUL + ["--steps", "6"]  # later flags win
    straight = tmp_path / "straight"
    assert main(args + ["--output_dir", str(straight)]) == 0
    run = tmp_path / "killed"
    command = args + ["--output_dir", str(run)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}

    def listed() -> list[int]:
        assert_checkpoints_readable(run)
        return [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(run / "checkpoints")]

    _killed_at(command, "generate", 3, env)  # sampling step 3
    assert listed() == [1, 2]
    _killed_at(command, "optimizer", UPDATES_PER_STEP + 1, env)  # resumed at 2; step 4's first update done
    assert listed() == [2, 3]
    _killed_at(command, "checkpoint", 3, env)  # resumed at 3; step 4 writes 2 files, then step 5's first one
    assert listed() == [3, 4]
    assert main(command) == 0

    a, b = metrics(straight), metrics(run)
    assert [m["step"] for m in b] == list(range(1, 7))  # step 5, logged before its checkpoint died, once
    kl_coefs = [m["objective/kl_coef"] for m in a]
    assert len(set(kl_coefs)) == 6  # the controller moved beta every step: restoring it matters
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], abs=1e-6, nan_ok=True), (x["step"], key)
    final = f"step-{6:08d}"
    for p, q in zip(load_file(straight / "checkpoints" / final / ckpt.WEIGHTS).values(),
                    load_file(run / "checkpoints" / final / ckpt.WEIGHTS).values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    for name in ("kl_ctl", "score_moments"):
        want = ckpt.read_state(straight / "checkpoints" / final)[name]
        assert ckpt.read_state(run / "checkpoints" / final)[name] == pytest.approx(want)


def test_resuming_with_another_process_count_is_refused_before_any_weight_is_loaded(setup, tmp_path):
    from tether.config import PPOConfig
    from tether.trainers import PPOTrainer

    run = tmp_path / "run"
    assert main(setup + ["--output_dir", str(run), "--steps", "1"]) == 0
    given = dict(zip(setup[1::2], setup[2::2]))  # the same run as the CLI's flags
    trainer = PPOTrainer(PPOConfig(model=given["--model"], prompts=given["--prompts"], reward=given["--reward"],
                                   batch_size=4, minibatch_size=2, max_new_tokens=6, top_k=8, learning_rate=3e-3,
                                   seed=3, steps=2, resume=True, output_dir=str(run)))
    before = {k: v.clone() for k, v in trainer.trainable.state_dict().items()}
    trainer.comm.num = 2  # as a launch on two processes would see it
    with pytest.raises(ValueError, match=r"was written by 1 process\(es\), this run has 2; .* resume with the same"):
        trainer.resume()
    assert trainer.step_count == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.trainable.state_dict().items())
    trainer.comm.num = 1
    trainer.resume()  # the same checkpoint does resume with one process, and loads the trained weights
    assert trainer.step_count == 1
    assert any(not torch.equal(before[k], v) for k, v in trainer.trainable.state_dict().items())


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(setup, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(setup + ["--output_dir", str(run), "--steps", "2"]) == 0
    real_save = ckpt.write_state

    def dying_save(*args, **kwargs):  # the weights are written, then the process "dies" mid-checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt, "write_state", dying_save)
    with pytest.raises(KeyboardInterrupt):
        main(setup + ["--output_dir", str(run), "--steps", "3"])
    monkeypatch.setattr(ckpt, "write_state", real_save)
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-00000001", "step-00000002"]
    assert (run / "checkpoints" / ".tmp-step-00000003").exists()  # never listed, never read
    assert_checkpoints_readable(run)
    assert main(setup + ["--output_dir", str(run), "--steps", "3"]) == 0  # resumes from step 2
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]


def test_fresh_start_over_checkpoints_is_refused_and_resume_needs_one(setup, tmp_path, capsys):
    run = tmp_path / "run"
    no_auto = [a for a in setup if a not in ("--resume", "auto")]
    assert main(no_auto + ["--output_dir", str(run), "--resume", "--steps", "1"]) == 2
    assert "holds no checkpoint to resume from" in capsys.readouterr().err
    assert main(no_auto + ["--output_dir", str(run), "--steps", "1"]) == 0
    assert main(no_auto + ["--output_dir", str(run), "--steps", "2"]) == 2
    assert "holds checkpoints of an earlier run (latest: step-00000001); pass --resume" in capsys.readouterr().err
    assert main(no_auto + ["--output_dir", str(run), "--steps", "2", "--resume"]) == 0
    assert main(no_auto + ["--output_dir", str(run), "--steps", "3", "--resume", "--learning_rate", "1e-4"]) == 2
    assert "cannot resume: the config differs from the checkpoint's in learning_rate: 0.003 -> 0.0001" in \
        capsys.readouterr().err


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Pruning renames a checkpoint out of the listed names before deleting it: a kill in the middle of the
    delete (simulated by an rmtree that removes one file, then dies) leaves only complete checkpoints listed."""
    root = tmp_path / "checkpoints"
    module = torch.nn.Linear(2, 2)
    for step in (1, 2):
        ckpt.save_checkpoint(root, step, module, {"step": step}, keep=2)
    real_rmtree = ckpt.shutil.rmtree

    def dying_rmtree(path, ignore_errors=False):
        files = sorted(Path(path).glob("*")) if Path(path).exists() else []
        if files:
            files[0].unlink()
            raise KeyboardInterrupt("killed while deleting")
        return real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt.shutil, "rmtree", dying_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 3, module, {"step": 3}, keep=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    assert_checkpoints_readable(tmp_path)
