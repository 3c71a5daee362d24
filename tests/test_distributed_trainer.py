"""The trainer on 2 processes (gloo, CPU, `accelerate launch`): the same rollouts give the same update as one
process holding them all, and a 2-process `tether ppo` run learns, checkpoints once and resumes."""

import functools
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from trainer_step import CASES, run  # noqa: E402

LAUNCH = {"ddp": "cpu_2proc.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml",
          "fsdp": "fsdp.yaml"}


@functools.cache
def _deepspeed_ops_built() -> None:
    """DeepSpeed's CPU collective compiled once here, not by both processes of the first launch at once."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_deepspeed_ops.py")], timeout=600, text=True,
                          capture_output=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # as the ranks see it
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _skip_without_deepspeed() -> None:
    """DeepSpeed is optional (the `deepspeed` extra) and on a machine without a GPU builds its CPU collective with
    a C++ compiler: without either, its launches are skipped, not failed."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs DeepSpeed: pip install --no-build-isolation 'tether[deepspeed]' (scripts/setup.sh does)")
    if not torch.cuda.is_available() and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("DeepSpeed on the CPU builds its shared-memory collective with a C++ compiler; none on PATH")


def _launch(args: list[str], tmp: Path, kind: str = "ddp", launch_flags: tuple[str, ...] = (), cpu_env: bool = True,
            ok: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch` with the example config for `kind`, 2 processes on this machine's CPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if kind in ("zero2", "zero3"):
        _skip_without_deepspeed()
        _deepspeed_ops_built()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    env.pop("ACCELERATE_USE_CPU", None)
    if kind in ("ddp", "fsdp") and cpu_env:  # DeepSpeed finds the CPU itself (gloo); DDP and FSDP must be told
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           str(ROOT / "examples/accelerate" / LAUNCH[kind]), "--num_processes", "2", "--main_process_port", str(port),
           *launch_flags, *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    """(kind, config) -> both processes' results of tests/dist/trainer_step.py for that config. DDP and FSDP run
    all their configs in one launch; DeepSpeed one launch per config, one engine per process as in a real run.
    (A DeepSpeed rank aborted at times at interpreter exit, "terminate called without an active exception";
    trainer_step.py therefore leaves with os._exit once both ranks' results are written.)"""
    done = {}

    def results(kind: str, name: str) -> list[dict]:
        key = (kind, name if kind.startswith("zero") else "")
        if key not in done:
            out = tmp_path_factory.mktemp(f"dist-step-{kind}")
            _launch([str(ROOT / "tests/dist/trainer_step.py"), str(out), kind, *([name] if key[1] else [])], out,
                    kind)
            done[key] = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
        return done[key]

    return results


COMPARED = ["ppo/loss/policy", "ppo/loss/total", "ppo/policy/ratio_mean", "ppo/policy/clipfrac", "ppo/policy/approxkl",
            "ppo/grad_norm", "objective/kl", "objective/kl_estimate", "objective/entropy", "objective/non_score_reward",
            "env/reward_mean", "env/reward_std", "ppo/advantages/mean", "tokens/response_len_mean", "tokens/eos_rate"]
WRAPPERS = {"ddp": "DistributedDataParallel", "zero2": "DeepSpeedEngine", "zero3": "DeepSpeedEngine",
            "fsdp": "FSDPTrained"}  # what wrapped the trained module
PAIRS = [(kind, name) for kind in sorted(CASES) for name in CASES[kind]]


@pytest.mark.parametrize("kind,name", PAIRS)
def test_two_process_update_equals_one_process_update(two_process, kind, name, tmp_path):
    if kind.startswith("zero"):
        _skip_without_deepspeed()  # before the one-process run it would compare with
    one = run(name, tmp_path, rank=0, num=1)
    keys = COMPARED + (["ppo/loss/value", "ppo/val/var_explained", "ppo/returns/mean"] if name.startswith("ppo")
                       else ["ppo/loss/kl"]) + (["ppo/critic_grad_norm"] if "critic" in name else [])
    if "critic" in name and kind.startswith("zero"):  # DeepSpeed has one norm over the policy and the critic
        keys = [k for k in keys if not k.endswith("grad_norm")]
    for res in two_process(kind, name):
        assert res[name]["wrapper"] == WRAPPERS[kind]
        assert res[name]["compiled"] == (name == "ppo_compile")  # torch.compile around DDP or the engine
        assert res[name]["param_type"] == ("DTensor" if kind == "fsdp" else "Parameter")
        for k in keys:
            assert abs(res[name]["stats"][k] - one["stats"][k]) < 1e-5, (k, res[name]["stats"][k], one["stats"][k])
    for res in two_process(kind, name)[:1 if kind in ("zero3", "fsdp") else 2]:  # sharded: gathered on the main one
        assert res[name]["weights"].keys() == one["weights"].keys()
        for k, w in one["weights"].items():  # every process ends with the single process's weights
            torch.testing.assert_close(res[name]["weights"][k], w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,name", PAIRS)
def test_skips_are_taken_on_every_process_and_leave_the_weights(two_process, kind, name):
    """A nan loss on one process (after another micro-batch's backward), a ratio over the threshold, and a
    nan score on one process: each is skipped everywhere, and no weight moves."""
    for res in two_process(kind, name):
        for first in (True, False):  # the nan in the first micro-batch, or in the second after a backward
            assert res[name]["faulted"][first]["faults/skipped_minibatches"] == 2  # 2 epochs of 1 minibatch
        assert res[name]["faulted"][False]["faults/skipped_steps"] == 2
        assert res[name]["over_ratio"]["ppo/skipped_ratio_minibatches"] == 2
        assert res[name]["skipped_updates_unchanged"]
        assert res[name]["skipped"]["faults/skipped_steps"] == 3
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
    assert max(kls) <= 10 and kls[-1] > 0, kls  # objective/kl is exact (>= 0 by construction): it moved, bounded
    samples = [json.loads(line) for line in (two / "samples.jsonl").read_text().splitlines()]
    assert len([s for s in samples if s["step"] == 1]) == 16  # both processes' completions, written once
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-00000030"]
    assert yaml.safe_load((two / "config.yaml").read_text())["batch_size"] == 16  # global, as given

    _launch(["-m", "tether.cli", "ppo", *_flags(run_files, "two", 33), "--resume"], run_files)
    assert len(_rewards(two)) == 33
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-00000033"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zero3", "fsdp"])
def test_sharded_tether_ppo_learns_resumes_and_saves_a_whole_model(run_files, kind):
    """ZeRO-3 and FSDP shard every parameter: generation runs in lockstep, checkpoints are every process's
    shards, and the final policy is gathered into a folder transformers loads."""
    from transformers import AutoModelForCausalLM

    # lr 5e-3, not _flags' 3e-3: at 3e-3 the ZeRO-3 run's last five steps averaged +0.193 over its first five, just
    # under the bar, after the length-grouped micro-batches changed its (chaotic) trajectory by round-off
    _launch(["-m", "tether.cli", "ppo", *_flags(run_files, kind, 30), "--learning_rate", "5e-3"], run_files, kind)
    run_dir = run_files / kind
    rewards = _rewards(run_dir)
    assert len(rewards) == 30
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    checkpoint = run_dir / "checkpoints" / "step-00000030"
    assert (checkpoint / "shards").is_dir() and not (checkpoint / "policy.safetensors").exists()
    start = AutoModelForCausalLM.from_pretrained(run_files / "model")
    # from_pretrained fills a missing weight with a fresh random one of the right shape, so shapes prove nothing:
    # every weight must be in the file, whole (a process's shard would have fewer elements), and finite
    trained, info = AutoModelForCausalLM.from_pretrained(run_dir / "policy", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    saved = load_file(run_dir / "policy" / "model.safetensors")
    whole = start.state_dict()
    assert {k for k in whole if k != "lm_head.weight"} <= saved.keys()  # GPT-2's LM head is the tied embedding
    for name, w in saved.items():
        assert w.shape == whole[name].shape and torch.isfinite(w).all(), name
    # the gathered weights are the trained ones: every layer moved, not only those on the main process's shard
    moved = {name.split(".")[2] if name.startswith("transformer.h.") else name
             for name, w in saved.items() if not torch.equal(w, whole[name])}
    assert {str(i) for i in range(start.config.n_layer)} <= moved and "transformer.wte.weight" in moved, moved

    _launch(["-m", "tether.cli", "ppo", *_flags(run_files, kind, 33), "--learning_rate", "5e-3", "--resume"], run_files,
            kind)
    assert len(_rewards(run_dir)) == 33
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000033"]


@pytest.mark.parametrize("kind,launch_flags,cpu_env,flags,message", [
    ("zero3", (), True, ["--lora_r", "2"], "LoRA (lora_r > 0) with sharded parameters (DeepSpeed ZeRO-3, FSDP)"),
    ("fsdp", (), True, ["--lora_r", "2"], "LoRA (lora_r > 0) with sharded parameters (DeepSpeed ZeRO-3, FSDP)"),
    ("zero2", ("--mixed_precision", "bf16"), True, [], "DEEPSPEED with mixed_precision=bf16 would keep the weights"),
    ("fsdp", ("--mixed_precision", "bf16"), True, [], "FSDP with mixed_precision=bf16 would keep the weights"),
    ("fsdp", ("--fsdp_version", "1"), True, [], "fsdp_version=1: tether runs FSDP 2 only"),
    ("zero2", ("--zero_stage", "0"), True, [], "zero_stage: 0 has no gradient averaging"),
    ("zero2", ("--offload_optimizer_device", "cpu"), True, [], "offload_optimizer is not supported yet"),
    ("ddp", (), False, [], "launched as 2 processes, but Accelerate sees 1"),
])
def test_launches_tether_cannot_run_are_refused_before_any_work(run_files, kind, launch_flags, cpu_env, flags, message):
    proc = _launch(["-m", "tether.cli", "ppo", *_flags(run_files, "refused", 2), *flags], run_files, kind,
                   launch_flags, cpu_env, ok=False)
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not (run_files / "refused" / "metrics.jsonl").exists()


def test_resuming_under_another_sharding_is_refused(run_files):
    """A DDP checkpoint holds whole weights and AdamW states; ZeRO-2 expects its own shards."""
    _skip_without_deepspeed()
    _launch(["-m", "tether.cli", "ppo", *_flags(run_files, "switch", 2)], run_files, "ddp")
    proc = _launch(["-m", "tether.cli", "ppo", *_flags(run_files, "switch", 3), "--resume"], run_files, "zero2",
                   ok=False)
    assert "written with sharding none and this run has deepspeed-zero2" in proc.stderr, proc.stderr[-3000:]
