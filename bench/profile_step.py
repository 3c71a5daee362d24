"""Where tether's step spends its time, per phase (tether's .venv):

    OMP_NUM_THREADS=2 python bench/profile_step.py b [--steps 2] [--ops 25] [--threads 2] [--precision bf16]

Same set-up as run_tether.py (prepare.py must have run). One untimed warm-up step, then --steps steps of
generate -> reward -> PPO step with light wrappers (perf_counter around the functions named in METHODS,
FUNCTIONS and OTHERS, looked up by name, so a refactored trainer simply drops the ones it no longer has).
Printed: inclusive wall-clock (--cpu: main-thread CPU) seconds per phase of the fastest step, and each phase's minimum over the steps;
with --ops N one more step runs under torch.profiler and its N most expensive operators (self CPU time) are
printed, by input shape, or with --stack K by their K innermost Python frames.
"""

import argparse
import functools
import importlib
import time
from collections import defaultdict

import torch
from workloads import PRECISIONS, WORKLOADS, token_share

TOTALS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)

# (attribute, label). Methods are wrapped on PPOTrainer (wherever it inherits them from); functions in every
# loaded tether.trainers module that imported them by name. Inclusive times: nested entries are parts of their parents.
METHODS = [
    ("generate", "1 generate"),
    ("score", "3 scoring forward (no grad)"),
]
FUNCTIONS = [
    ("optimise", "6 PPO epochs"),
    ("policy_logprobs", "   replay + log-probs (policy_logprobs)"),
    ("gather_logprobs", "   gather_logprobs"),
    ("kl_full", "   kl_full"),
    ("entropy_from_logits", "   entropy_from_logits"),
    ("token_stats", "   token_stats (fused)"),
    ("response_forward", "   reference forward"),
    ("policy_loss", "   policy_loss"),
    ("value_loss", "   value_loss"),
]
OTHERS = [  # (module, attribute path, label)
    ("tether.models.policy", "PolicyWithValueHead.forward", "   policy forward (+value head)"),
    ("torch", "Tensor.backward", "   backward"),
    ("torch.nn.utils", "clip_grad_norm_", "   clip_grad_norm_"),
    ("torch.optim.adamw", "AdamW.step", "   optimizer.step"),
    ("tether.rollout.generate", "draw", "   draw (sampling)"),
]
LABELS = [label for _, label in METHODS + FUNCTIONS] + [label for _, _, label in OTHERS]


CLOCK = [time.perf_counter]  # --cpu: time.thread_time


def timed(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = CLOCK[0]()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTALS[label] += CLOCK[0]() - t0
            CALLS[label] += 1
    return wrapper


def install() -> None:
    import sys

    from tether.trainers import PPOTrainer

    for name, label in METHODS:
        if hasattr(PPOTrainer, name):
            setattr(PPOTrainer, name, timed(label, getattr(PPOTrainer, name)))
    modules = [m for n, m in list(sys.modules.items()) if n.startswith("tether.trainers") and m is not None]
    for name, label in FUNCTIONS:
        for module in modules:
            if callable(getattr(module, name, None)):
                setattr(module, name, timed(label, getattr(module, name)))
    for module_name, path, label in OTHERS:
        owner = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for p in parents:
            owner = getattr(owner, p, None)
        if owner is not None and hasattr(owner, name):
            setattr(owner, name, timed(label, getattr(owner, name)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--ops", type=int, default=0, help="also profile the last step's operators (top N)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="tether's PPOConfig.precision")
    parser.add_argument("--cpu", action="store_true", help="CPU seconds of the main thread instead of wall-clock: "
                        "with --threads 1 (and OMP_NUM_THREADS=1) the work itself, whatever else shares the cores")
    parser.add_argument("--stack", type=int, default=0, help="with --ops: group operators by their N innermost "
                        "Python frames")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu:
        CLOCK[0] = time.thread_time
    install()
    w = WORKLOADS[args.workload]
    from run_tether import workload_trainer

    from tether.demo import vader_reward

    trainer, prompt_ids, _ = workload_trainer(w, args.steps, "tether-profile", args.precision)
    queries = [torch.tensor(q) for q in prompt_ids]

    def one_step() -> float:
        t0 = time.perf_counter()
        gen = trainer.generate(queries)
        scores = (vader_reward([""] * len(gen.texts), gen.texts) if w.reward == "vader"
                  else token_share([r.tolist() for r in gen.responses]))
        trainer.step(gen.queries, gen.responses, scores)
        return time.perf_counter() - t0

    one_step()  # warm-up
    per_step, cpu = [], []
    for _ in range(args.steps):
        TOTALS.clear(), CALLS.clear()
        c0, t0 = time.process_time(), CLOCK[0]()
        one_step()
        per_step.append({**TOTALS, "step": CLOCK[0]() - t0})
        cpu.append(time.process_time() - c0)
    calls = dict(CALLS)
    fastest = min(per_step, key=lambda s: s["step"])
    steps = ", ".join(f"{s['step']:.2f}" for s in per_step)
    print(f"workload ({w.name}), {args.precision}, {args.steps} timed steps, torch threads {torch.get_num_threads()}, "
          f"{'main-thread CPU' if args.cpu else 'wall-clock'} seconds: "
          f"fastest {fastest['step']:.3f} s/step (all: {steps}), CPU-s/step {min(cpu):.2f} (min)")
    # Per phase: the fastest step's time, and the minimum over steps (each phase's least disturbed run; on a
    # shared CPU that is the better estimate of what the phase costs).
    print("| phase (inclusive) | fastest step, s | share | min over steps, s | calls/step |\n|---|---:|---:|---:|---:|")
    for label in LABELS:
        if label in fastest:
            least = min(s.get(label, 0.0) for s in per_step)
            print(f"| {label} | {fastest[label]:.3f} | {100 * fastest[label] / fastest['step']:.1f}% "
                  f"| {least:.3f} | {calls.get(label, 0)} |")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=bool(args.stack)) as prof:
            one_step()
        events = (prof.key_averages(group_by_stack_n=args.stack) if args.stack
                  else prof.key_averages(group_by_input_shape=True))
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.ops, max_name_column_width=40,
                           max_shapes_column_width=60))


if __name__ == "__main__":
    main()
