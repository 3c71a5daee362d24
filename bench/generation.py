"""Generation workload: tether's own decoding loop against vLLM (rollout_engine: vllm) on SmolLM2-135M-Instruct.

Tokens per second of `RLTrainer.generate` at 128 and 512 new tokens (min_new_tokens = max_new_tokens, so both
engines produce exactly the same number of tokens), and the whole GRPO step (generation, reward, scoring, update and
the weight push) with each engine, side by side in one run. Each measurement runs in its own process (one model, one
engine, nothing left over from the last), after an untimed warm-up generation (which for vLLM includes the first
weight push).

    python bench/generation.py                      # every measurement, then the table
    python bench/generation.py --engine vllm --new-tokens 128   # one, as JSON

Threads: torch's (OMP_NUM_THREADS); vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) on the same
threads. On the CPU vLLM's KV cache is VLLM_CPU_KVCACHE_SPACE GiB (2 here unless set).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROMPTS = 32  # completions per generation measurement
STEP = {"batch_size": 16, "num_generations": 4, "minibatch_size": 8, "ppo_epochs": 1, "max_new_tokens": 128}


def length_reward(prompts, completions):
    return [len(c) / 100 for c in completions]


def trainer_for(engine: str, new_tokens: int, output_dir: str, **keys):
    from tether import PPOConfig
    from tether.demo import movie_review_openings
    from tether.models.smollm2 import smollm2_path
    from tether.trainers import GRPOTrainer

    vllm = {"vllm_enforce_eager": True} if engine == "vllm" else {}
    cfg = PPOConfig(algorithm="grpo", model=str(smollm2_path()), prompts="tether.demo:movie_review_openings",
                    rollout_engine=engine, max_new_tokens=new_tokens, min_new_tokens=new_tokens, seed=0,
                    precision="fp32", report_to=["none"], output_dir=output_dir, samples_every=0, **vllm, **keys)
    return GRPOTrainer(cfg, reward=length_reward), movie_review_openings()


def measure_generation(engine: str, new_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        trainer, prompts = trainer_for(engine, new_tokens, out)
        build = time.perf_counter() - t0
        queries = [trainer.encode(p, "prompt") for p in (prompts * PROMPTS)[:PROMPTS]]
        trainer.generate(queries[:4])  # warm-up (and vLLM's first weight push)
        t0 = time.perf_counter()
        gen = trainer.generate(queries)
        seconds = time.perf_counter() - t0
        tokens = sum(len(r) for r in gen.responses)
        return {"engine": engine, "new_tokens": new_tokens, "completions": len(queries), "tokens": tokens,
                "seconds": seconds, "tokens_per_s": tokens / seconds, "build_s": build}


def measure_step(engine: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        keys = {k: v for k, v in STEP.items() if k != "max_new_tokens"}
        trainer, _ = trainer_for(engine, STEP["max_new_tokens"], out, steps=3, **keys)
        history = trainer.train()
        last = history[1:]  # the first step pays for warm-ups
        mean = lambda key: sum(h[key] for h in last) / len(last)  # noqa: E731
        return {"engine": engine, "step": STEP, "time_step": mean("time/step"), "time_generate": mean("time/generate"),
                "mismatch_kl": max(h["rollout/mismatch_kl"] for h in history),
                "mismatch_max_gap": max(h["rollout/mismatch_max_gap"] for h in history)}


def run_all() -> None:
    rows = []
    for args in ([e, "--new-tokens", n] for n in ("128", "512") for e in ("tether", "vllm")):
        rows.append(_child(args))
    steps = [_child([e, "--step"]) for e in ("tether", "vllm")]
    print("\n| engine | new tokens | completions | tokens/s | engine build s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['new_tokens']} | {r['completions']} | {r['tokens_per_s']:.0f} | "
              f"{r['build_s']:.0f} |")
    print(f"\nGRPO step {STEP} (mean of steps 2-3):\n\n| engine | step s | of it generation s | mismatch_kl (max) | "
          f"largest per-token gap |\n|---|---|---|---|---|")
    for s in steps:
        print(f"| {s['engine']} | {s['time_step']:.1f} | {s['time_generate']:.1f} | {s['mismatch_kl']:.2e} | "
              f"{s['mismatch_max_gap']:.2e} |")


def _child(args: list[str]) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    proc = subprocess.run([sys.executable, __file__, "--engine", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("tether", "vllm"))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--step", action="store_true", help="time the whole GRPO step instead")
    args = parser.parse_args()
    if args.engine is None:
        return run_all()
    result = measure_step(args.engine) if args.step else measure_generation(args.engine, args.new_tokens)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
