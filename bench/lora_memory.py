"""What a LoRA policy saves: PPO on SmolLM2-135M-Instruct, full fine-tuning vs LoRA (tether's .venv):

    OMP_NUM_THREADS=2 python bench/lora_memory.py [--lora_r 16] [--steps 1] [--out bench/results/lora_memory]

Each setting runs in its own subprocess, so its peak RSS (`ru_maxrss`) is its own:

    full  every weight trained; the reference is a frozen copy of the starting policy (a second set of weights)
    lora  LoRA adapters on every linear layer but the output head (rank --lora_r); the reference is the same
          model with its adapters disabled, so no second copy of the weights

Both build a PPOTrainer on CPU (batch 4, minibatch 4, max_new_tokens 8, a constant reward, the other keys at
their defaults: ppo_epochs 4, shared value head, fp32) and run --steps steps of generate -> step. Reported per
setting: parameter bytes of the policy (with its value head) and of the reference (tied tensors counted once,
the reference only where it is a separate copy), trainable parameters, gradient bytes and AdamW state bytes
after the step, peak RSS after start-up / after building the trainer / after the steps, and the seconds of
each generate and step. Results: OUT.json (raw) and OUT.md (a table).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["The movie was", "I watched this film and", "Honestly, the acting", "The plot of this one"]
SETTINGS = ("full", "lora")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def child(setting: str, lora_r: int, steps: int, threads: int) -> dict:
    rss_start = _peak_rss_mib()
    import torch

    torch.set_num_threads(threads)
    from tether import PPOConfig, PPOTrainer
    from tether.models.smollm2 import smollm2_path

    rss_imports = _peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        config = PPOConfig(model=str(smollm2_path()), output_dir=tmp, steps=steps, batch_size=4, minibatch_size=4,
                           max_new_tokens=8, device="cpu", lora_r=lora_r if setting == "lora" else 0)
        t0 = time.perf_counter()
        trainer = PPOTrainer(config, prompts=PROMPTS, reward=lambda prompts, completions: [1.0] * len(completions))
        build_s = time.perf_counter() - t0
        rss_built = _peak_rss_mib()
        policy_params = list(trainer.policy.parameters())
        ref_params = [] if trainer.ref is None else list(trainer.ref.parameters())
        timings = []
        for _ in range(steps):
            t0 = time.perf_counter()
            gen = trainer.generate(PROMPTS)
            t1 = time.perf_counter()
            trainer.step(gen.queries, gen.responses, [1.0] * len(PROMPTS))
            timings.append({"generate_s": t1 - t0, "step_s": time.perf_counter() - t1})
        trainable = [p for p in trainer.trainable.parameters() if p.requires_grad]
        optimiser_state = [v for state in trainer.optimizer.state.values() for v in state.values()
                           if torch.is_tensor(v)]
        return {
            "setting": setting,
            "lora_r": config.lora_r,
            "threads": threads,
            "steps": steps,
            "policy_param_bytes": _tensor_bytes(policy_params),
            "reference_param_bytes": _tensor_bytes(ref_params),
            "param_bytes_total": _tensor_bytes(policy_params + ref_params),
            "trainable_params": sum(p.numel() for p in {id(p): p for p in trainable}.values()),
            "total_params": sum(p.numel() for p in {p.data_ptr(): p for p in policy_params}.values()),
            "grad_bytes": _tensor_bytes([p.grad for p in trainable]),
            "optimiser_state_bytes": _tensor_bytes(optimiser_state),
            "peak_rss_mib_at_start": rss_start,
            "peak_rss_mib_after_imports": rss_imports,
            "peak_rss_mib_after_build": rss_built,
            "peak_rss_mib": _peak_rss_mib(),
            "build_s": build_s,
            "timings": timings,
        }


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table(results: list[dict]) -> str:
    rows = [
        ("trainable parameters", lambda r: f"{r['trainable_params']:,} of {r['total_params']:,}"),
        ("policy parameter bytes (with value head)", lambda r: _mib(r["policy_param_bytes"])),
        ("reference parameter bytes (separate copy)", lambda r: _mib(r["reference_param_bytes"])),
        ("policy + reference parameter bytes", lambda r: _mib(r["param_bytes_total"])),
        ("gradient bytes", lambda r: _mib(r["grad_bytes"])),
        ("AdamW state bytes", lambda r: _mib(r["optimiser_state_bytes"])),
        ("peak RSS after imports", lambda r: f"{r['peak_rss_mib_after_imports']:,.0f} MiB"),
        ("peak RSS after building the trainer", lambda r: f"{r['peak_rss_mib_after_build']:,.0f} MiB"),
        ("peak RSS after the step(s)", lambda r: f"{r['peak_rss_mib']:,.0f} MiB"),
        ("building the trainer", lambda r: f"{r['build_s']:.1f} s"),
        ("generate (per step)", lambda r: ", ".join(f"{t['generate_s']:.1f} s" for t in r["timings"])),
        ("step: scoring + 4 PPO epochs (per step)", lambda r: ", ".join(f"{t['step_s']:.1f} s" for t in r["timings"])),
    ]
    names = [("full fine-tuning + frozen reference copy" if r["setting"] == "full" else f"LoRA r={r['lora_r']}")
             for r in results]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(results)]
    lines += [f"| {label} | " + " | ".join(cell(r) for r in results) + " |" for label, cell in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--out", default="bench/results/lora_memory")
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.lora_r, args.steps, args.threads)), flush=True)
        return
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for setting in SETTINGS:
        proc = subprocess.run([sys.executable, __file__, "--child", setting, "--lora_r", str(args.lora_r),
                               "--steps", str(args.steps), "--threads", str(args.threads)],
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{setting} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:]))
        print(f"{setting}: done, peak RSS {results[-1]['peak_rss_mib']:,.0f} MiB", flush=True)
    load = os.getloadavg()
    meta = {"command": " ".join(["python", "bench/lora_memory.py", *sys.argv[1:]]), "threads": args.threads,
            "load_average_after": [round(x, 2) for x in load], "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    md = table(results)
    out.with_suffix(".md").write_text(f"`OMP_NUM_THREADS={args.threads} {meta['command']}`; load average after: "
                                      f"{meta['load_average_after']}\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
