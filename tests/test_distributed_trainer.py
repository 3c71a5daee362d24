"""The trainer on 2 processes (gloo, CPU, `accelerate launch`): the same rollouts give the same update as one
process holding them all, and a 2-process `tether ppo` run learns, checkpoints once and resumes."""

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from trainer_step import CONFIGS, run  # noqa: E402


def _launch(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           str(ROOT / "examples/accelerate/cpu_2proc.yaml"), "--main_process_port", str(port), *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-step")
    _launch([str(ROOT / "tests/dist/trainer_step.py"), str(out)], out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


COMPARED = ["ppo/loss/policy", "ppo/loss/total", "ppo/policy/ratio_mean", "ppo/policy/clipfrac", "ppo/policy/approxkl",
            "ppo/grad_norm", "objective/kl", "objective/kl_estimate", "objective/entropy", "objective/non_score_reward",
            "env/reward_mean", "env/reward_std", "ppo/advantages/mean", "tokens/response_len_mean", "tokens/eos_rate"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_process_update_equals_one_process_update(two_process, name, tmp_path):
    one = run(name, tmp_path, rank=0, num=1)
    keys = COMPARED + (["ppo/loss/value", "ppo/val/var_explained", "ppo/returns/mean"] if name.startswith("ppo")
                       else ["ppo/loss/kl"]) + (["ppo/critic_grad_norm"] if "critic" in name else [])
    for res in two_process:
        assert res["distributed_type"].endswith("MULTI_CPU")
        for k in keys:
            assert abs(res[name]["stats"][k] - one["stats"][k]) < 1e-5, (k, res[name]["stats"][k], one["stats"][k])
        for k, w in one["weights"].items():  # every process ends with the single process's weights
            torch.testing.assert_close(res[name]["weights"][k], w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_nan_score_on_one_process_skips_the_step_on_both(two_process, name):
    for res in two_process:
        assert res[name]["skipped"]["faults/skipped_steps"] == 1
        assert res[name]["unchanged_after_skip"]


@pytest.fixture
def run_files(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_model, make_tokenizer
    from test_ppo_learns import PROMPTS

    tok = make_tokenizer(pad=False)
    make_model(len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return tmp_path


def _flags(files: Path, out: str, steps: int) -> list[str]:
    return ["--model", str(files / "model"), "--prompts", str(files / "prompts.jsonl"), "--reward",
            "rewards_for_tests:count_good", "--output_dir", str(files / out), "--steps", str(steps),
            "--batch_size", "16", "--minibatch_size", "8", "--max_new_tokens", "8", "--learning_rate", "3e-3",
            "--checkpoint_every", "10", "--samples_per_step", "16"]


def _rewards(run_dir: Path) -> list[float]:
    return [json.loads(line)["env/reward_mean"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_tether_ppo_learns_like_one_process_and_resumes(run_files):
    from tether.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["ppo", *_flags(run_files, "one", 30)]) == 0
    _launch(["-m", "tether.cli", "ppo", *_flags(run_files, "two", 30)], run_files)
    for name in ("one", "two"):
        rewards = _rewards(run_files / name)
        assert len(rewards) == 30
        assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, (name, rewards)
    two = run_files / "two"
    kls = [json.loads(line)["objective/kl"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= k <= 10 for k in kls), kls
    samples = [json.loads(line) for line in (two / "samples.jsonl").read_text().splitlines()]
    assert len([s for s in samples if s["step"] == 1]) == 16  # both processes' completions, written once
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-00000030"]
    assert yaml.safe_load((two / "config.yaml").read_text())["batch_size"] == 16  # global, as given

    _launch(["-m", "tether.cli", "ppo", *_flags(run_files, "two", 33), "--resume"], run_files)
    assert len(_rewards(two)) == 33
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-00000033"]
