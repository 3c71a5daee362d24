"""Runs survive: SIGKILL at random points, resume, and every step's metrics equal the uninterrupted run's."""

import json
import os
import random
import subprocess
import sys
import time
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


def test_sigkill_anywhere_then_resume_matches_uninterrupted(setup, tmp_path):
    straight = tmp_path / "straight"
    assert main(setup + ["--output_dir", str(straight)]) == 0

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "tether.cli", *setup, "--output_dir", str(run)]
    rng = random.Random(0)
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done_before = len(metrics(run)) if (run / "metrics.jsonl").exists() else 0
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:  # wait for this process's first own step
            if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) > done_before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.25))  # then kill it somewhere: generating, optimising, checkpointing
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
        assert_checkpoints_readable(run)
        if proc.returncode == 0:
            break
    assert kills >= 2, "the run finished before it could be interrupted twice; the test proves nothing"
    if proc.returncode != 0:
        assert main(setup + ["--output_dir", str(run)]) == 0
    a, b = metrics(straight), metrics(run)
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], abs=1e-6, nan_ok=True), (x["step"], key)
    for p, q in zip(load_file(straight / "checkpoints" / f"step-{STEPS:08d}" / ckpt.WEIGHTS).values(),
                    load_file(run / "checkpoints" / f"step-{STEPS:08d}" / ckpt.WEIGHTS).values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


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
