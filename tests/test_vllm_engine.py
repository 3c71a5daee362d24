"""rollout_engine=vllm on vLLM's CPU build (the `vllm` extra): the engine holds the trained weights after every
update (and after a resume), its log-probs agree with the trainer's, GRPO and PPO learn with it, and what it cannot
do is refused by name. One engine is built for the whole file (about 30 s) and every trainer here reuses it: each
trainer's engine pushes its own policy's weights into it before its first generation, like a fresh one."""

import math
import os

import pytest
import torch
from conftest import make_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from tether import PPOConfig
from tether.rollout import engines
from tether.trainers import trainer_class

vllm = pytest.importorskip("vllm", reason="the vllm extra (pip install 'tether[vllm]') is not installed")

PROMPTS = ["the movie was", "i really", "a story", "the actor and", "we", "it is not", "the plot was very", "music"]
MAX_LEN = 48  # the shared engine's max_model_len: the longest prompt above plus max_new_tokens, with room
TOLERANCE = 1e-4  # engine vs trainer log-probs in fp32 (measured: 2.4e-7; stale weights: 0.99)


def make_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama (vLLM's CPU attention takes a head size of 32, not the GPT-2 fixture's 16)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=0, pad_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def shared_llm():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for these sizes
    from tether.rollout.vllm_engine import VLLMEngine

    tok = make_tokenizer()
    c = PPOConfig(rollout_engine="vllm", vllm_enforce_eager=True)
    engine = VLLMEngine(c, make_llama(len(tok)), [0], torch.Generator(), MAX_LEN, None)
    yield engine.llm


@pytest.fixture
def reuse_engine(shared_llm, monkeypatch):
    """Every trainer built in the test gets a VLLMEngine around the shared LLM."""
    from tether.rollout.vllm_engine import VLLMEngine

    def build(t, generator):
        return VLLMEngine(t.config, t.policy.model, t.eos_token_ids, generator, MAX_LEN, t.autocast_dtype,
                          llm=shared_llm)

    monkeypatch.setitem(engines.ENGINES, "vllm", build)


def share_of_good(tok):
    good = tok.convert_tokens_to_ids("good")

    def reward(prompts, completions):
        return [sum(i == good for i in (tok(t)["input_ids"] or [None])) / max(len(tok(t)["input_ids"]), 1)
                for t in completions]
    return reward


def build(algorithm: str, tmp_path, **keys):
    tok = make_tokenizer()
    keys = {"steps": 3, "batch_size": 16, "minibatch_size": 8, "ppo_epochs": 2, "max_new_tokens": 8, "seed": 0,
            "learning_rate": 3e-3, "rollout_engine": "vllm", "report_to": ["none"], "output_dir": str(tmp_path),
            **keys}
    cfg = PPOConfig(algorithm=algorithm, **keys)
    return trainer_class(algorithm)(cfg, model=make_llama(len(tok)), tokenizer=tok, prompts=PROMPTS,
                                    reward=share_of_good(tok))


def fixed_sequence(trainer) -> tuple[list[int], int]:
    tok = trainer.tokenizer
    prompt = tok("the movie was")["input_ids"]
    return prompt + tok("very good and fun but long")["input_ids"], len(prompt)


def trainer_logprobs(trainer, ids: list[int], start: int) -> torch.Tensor:
    with torch.no_grad():
        logits = trainer.policy.model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[start - 1:-1], -1)
    return logp.gather(-1, torch.tensor(ids[start:])[:, None])[:, 0]


def gap(trainer) -> float:
    ids, start = fixed_sequence(trainer)
    return (trainer.engine.prompt_logprobs(ids, start) - trainer_logprobs(trainer, ids, start)).abs().max().item()


def test_engine_holds_the_trained_weights_and_stale_ones_are_told_apart(tmp_path, reuse_engine):
    trainer = build("grpo", tmp_path / "pushed")
    ids, start = fixed_sequence(trainer)
    before = trainer_logprobs(trainer, ids, start)
    trainer.train()  # 3 steps, each followed by a push before the next generation
    moved = (trainer_logprobs(trainer, ids, start) - before).abs().max().item()
    assert moved > 100 * TOLERANCE, moved  # training changed the log-probs well beyond the tolerance
    assert gap(trainer) < TOLERANCE
    assert trainer.engine.pushes >= 3

    stale = build("grpo", tmp_path / "stale")
    stale.engine.weights_changed = lambda: None  # the push after each update switched off: only the first remains
    stale.train()
    assert stale.engine.pushes == 1
    assert gap(stale) > 100 * TOLERANCE  # the same check tells the stale weights


SAMPLING = {"temperature": 0.8, "top_k": 8, "top_p": 0.9, "min_new_tokens": 2, "repetition_penalty": 1.2}
MISMATCH_KL_BOUND = 1e-6  # per token, fp32; measured about 1e-13 (largest per-token gap about 4e-6)


@pytest.mark.parametrize("engine", ["tether", "vllm"])
def test_mismatch_small_and_correction_near_one(tmp_path, reuse_engine, engine):
    history = build("grpo", tmp_path, steps=2, rollout_engine=engine, **SAMPLING).train()
    for h in history:
        assert 0 <= h["rollout/mismatch_kl"] < MISMATCH_KL_BOUND, h
        assert h["rollout/mismatch_max_gap"] < 1e-3, h
        if engine == "vllm":  # tis by default with vLLM; off with tether's loop
            assert abs(h["rollout/correction_mean"] - 1) < 1e-3 and h["rollout/correction_capped_frac"] == 0, h
        else:
            assert "rollout/correction_mean" not in h


def assert_learned(history: list[dict], gain: float) -> None:
    rewards = [h["env/reward_mean"] for h in history]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + gain, rewards
    kls = [h["objective/kl"] for h in history]
    assert all(0 <= k <= 10 for k in kls) and kls[-1] > 0, kls


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_short_runs_learn_with_vllm(tmp_path, reuse_engine, algorithm):
    history = build(algorithm, tmp_path, steps=24, ppo_epochs=4, learning_rate=1e-3).train()
    assert_learned(history, gain=0.1)  # measured: +0.53 (grpo), +0.17 (ppo) from about 0.05
    assert all(h["rollout/mismatch_kl"] < MISMATCH_KL_BOUND for h in history)


def test_resumed_run_generates_with_the_restored_weights(tmp_path, reuse_engine):
    first = build("grpo", tmp_path, steps=2, checkpoint_every=2)
    first.train()
    resumed = build("grpo", tmp_path, steps=4, checkpoint_every=2, resume=True)
    seen = []
    engine = resumed.engine

    class Spy:  # the engine as the trainer calls it, checked at the first generation
        weights_changed = engine.weights_changed

        def __call__(self, queries):
            if not seen:
                seen.append(gap(resumed))
            return engine(queries)

    resumed.engine = Spy()
    resumed.engine.prompt_logprobs = engine.prompt_logprobs
    history = resumed.train()
    assert len(history) == 2 and seen[0] < TOLERANCE, seen  # steps 3 and 4, from the step-2 weights
    ids, start = fixed_sequence(resumed)
    fresh = trainer_logprobs(build("grpo", tmp_path / "fresh"), ids, start)
    assert (trainer_logprobs(first, ids, start) - fresh).abs().max() > 100 * TOLERANCE  # the weights had moved


# ---- refused before any model loads (no engine needed) -------------------------------------------------------
@pytest.mark.parametrize("keys, message", [
    ({"rollout_engine": "vllm", "no_repeat_ngram_size": 2}, "no_repeat_ngram_size=2 with rollout_engine=vllm"),
    ({"rollout_correction": "tis"}, "rollout_correction=tis with rollout_engine=tether"),
    ({"vllm_enforce_eager": True}, "vllm_enforce_eager=True only acts with rollout_engine=vllm"),
    ({"rollout_engine": "vllm", "rollout_correction": "none", "rollout_correction_cap": 3.0},
     "rollout_correction_cap=3.0 only acts with rollout_correction"),
    ({"rollout_engine": "vllm", "rollout_correction_cap": 1.0}, "rollout_correction_cap=1.0 must be > 1"),
    ({"rollout_engine": "vllm", "vllm_gpu_memory_utilization": 1.5}, "vllm_gpu_memory_utilization=1.5"),
    ({"rollout_engine": "vllm", "vllm_max_model_len": 16, "max_new_tokens": 16}, "vllm_max_model_len=16 must"),
    ({"rollout_engine": "sglang"}, "rollout_engine='sglang' is not one of"),
    ({"rollout_engine": "vllm", "temperature": 1e-6}, "temperature=1e-06 with rollout_engine=vllm"),
])
def test_refused_settings_are_named(keys, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        PPOConfig(**keys)


def test_logits_processors_and_sharding_refused_before_models_load(tmp_path):
    from transformers.generation import logits_process as lp

    from tether.trainers import RLTrainer

    cfg = PPOConfig(rollout_engine="vllm", output_dir=str(tmp_path), model="no/such-model")
    with pytest.raises(ValueError, match=r"logits_processors \['NoBadWordsLogitsProcessor'\] with rollout_engine=vllm"):
        RLTrainer(cfg, logits_processors=[lp.NoBadWordsLogitsProcessor([[3]], eos_token_id=0)])
    assert "sharded parameters (DeepSpeed ZeRO-3)" in engines.vllm_refusals([], "DeepSpeed ZeRO-3")[0]


def test_missing_vllm_names_the_pip_command(tmp_path, monkeypatch):
    from tether import extras
    from tether.trainers import RLTrainer

    real = extras._installed
    monkeypatch.setattr(extras, "_installed", lambda module: module != "vllm" and real(module))
    with pytest.raises(ImportError, match=r"vllm \(needed by rollout_engine=vllm\): pip install 'tether\[vllm\]'"):
        RLTrainer(PPOConfig(rollout_engine="vllm", output_dir=str(tmp_path), model="no/such-model"))


@pytest.mark.parametrize("shift, bound, factor", [(1.5, "tis", 1.5), (3.0, "tis", 2.0), (3.0, "mis", 0.0)])
def test_correction_weights_scale_the_policy_loss(tmp_path, reuse_engine, shift, bound, factor):
    """One update (ratio 1 throughout): with engine log-probs lower than the trainer's by log(shift) on every token,
    rho = shift, and the policy loss is that of weights 1 times min(shift, 2) (tis) or 0 above the cap (mis)."""
    keys = {"steps": 1, "ppo_epochs": 1, "minibatch_size": 16, "rollout_correction": bound}
    runs = []
    for offset in (0.0, math.log(shift)):
        trainer = build("grpo", tmp_path / f"{offset}", **keys)
        gen = trainer.generate([p for p in PROMPTS[:4] for _ in range(4)])
        stats = trainer.step(gen.queries, gen.responses, [float(i % 3) for i in range(16)],
                             behaviour_logprobs=[lp - offset for lp in gen.logprobs])
        runs.append(stats)
    plain, shifted = runs
    assert abs(plain["rollout/correction_mean"] - 1) < 1e-3
    assert abs(shifted["rollout/correction_mean"] - factor) < 1e-3
    loss = plain["ppo/loss/policy"]
    assert abs(shifted["ppo/loss/policy"] - factor * loss) < 1e-4 * (1 + abs(loss))


def test_lora_adapters_are_merged_into_the_pushed_weights(tmp_path, reuse_engine):
    pytest.importorskip("peft")
    from tether.rollout.vllm_engine import merged_weights

    trainer = build("grpo", tmp_path, steps=2, lora_r=4, learning_rate=1e-2)
    trainer.train()
    lora = [(n, p) for n, p in trainer.policy.model.named_parameters() if "lora_B" in n]
    assert lora and max(p.abs().max().item() for _, p in lora) > 0  # the adapters moved off their zero start
    assert gap(trainer) < TOLERANCE
    assert not any("base_layer" in n or "lora_" in n for n, _ in merged_weights(trainer.policy.model))


def test_two_processes_each_generate_with_their_own_engine(tmp_path):
    """DDP on 2 CPU processes (gloo): every process's engine holds the trained weights after the updates, the
    processes sample different completions (their own seeds), and the metrics are over both."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": os.pathsep.join([str(root / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           str(root / "examples/accelerate/cpu_2proc.yaml"), "--num_processes", "2", "--main_process_port", str(port),
           str(root / "tests/dist/vllm_run.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["gap"] < TOLERANCE and r["pushes"] == 3  # before steps 1 and 2, and before the last generation
        assert all(h["rollout/mismatch_kl"] < MISMATCH_KL_BOUND for h in r["history"])
    assert ranks[0]["history"][-1]["objective/kl"] == ranks[1]["history"][-1]["objective/kl"]  # over both
    assert ranks[0]["sampled"] != ranks[1]["sampled"]
