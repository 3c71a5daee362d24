"""Workload (c) and the response-length curves: what run_tether_grpo.py and run_trl_grpo.py both run.

Imports only torch, the standard library and workloads.py, so it loads in tether's .venv and in
bench/.venv-trl116 alike. The inputs (model folders, prompt ids and texts) are the ones prepare.py writes:

    c-tiny    GRPO on (a)'s random GPT-2 (4 layers, width 256, vocabulary 4096): 16 prompts x 4 completions
              = 64 rollouts of up to 32 tokens, reward = share of token id 7 (EOS enabled)
    c-smol    GRPO on SmolLM2-135M-Instruct: 4 movie-review openings x 4 = 16 rollouts of up to 24 tokens,
              reward = VADER compound of the completion (EOS enabled)
    v-ppo-L   the curve workload (prepared folder v: 2 layers, width 64, vocabulary 151,936): PPO, 8 prompts x 1,
              one epoch, minibatch 8, exactly L response tokens (EOS suppressed: min_new_tokens = L); tether only
    v-grpo-L  the same model, GRPO: 2 prompts x 4 = 8 rollouts of exactly L tokens, KL term in the loss
    v-...-L-eosout  the same, with EOS an id outside the vocabulary (prepared copy of folder v) instead of
              min_new_tokens = L: no sampling rule at all, so tether's sampler has nothing to replay

Every workload does one update per generation (one minibatch = the whole batch, one epoch, no gradient
accumulation), learning rate 1e-5, KL coefficient beta = 0.05 (fixed), temperature 1, no top-k / top-p, gradient
norm clipped at 1.0, AdamW eps 1e-5, no weight decay, constant learning rate, fp32.
"""

import argparse
import os
import re
import time
from dataclasses import asdict, dataclass
from statistics import median

import torch
from workloads import peak_rss_mb

CURVE_LENGTHS = (32, 64, 128, 240)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # dense products (attention kernels not counted)


@dataclass(frozen=True)
class RLWorkload:
    name: str
    inputs: str  # prepare.py's folder: a, b or v
    algorithm: str  # grpo or ppo (ppo: tether only)
    prompts: int  # distinct prompts per step
    num_generations: int  # completions per prompt
    max_new_tokens: int
    reward: str  # token_share or vader
    force_length: bool = False  # EOS suppressed until max_new_tokens: every completion is exactly max_new_tokens long
    eos_outside: bool = False  # ... by an EOS id outside the vocabulary instead of min_new_tokens = max_new_tokens
    learning_rate: float = 1e-5
    beta: float = 0.05  # KL coefficient: TRL's beta, tether's init_kl_coef (fixed)
    seed: int = 0

    @property
    def batch_size(self) -> int:
        return self.prompts * self.num_generations


FIXED = {
    "c-tiny": RLWorkload("c-tiny", "a", "grpo", prompts=16, num_generations=4, max_new_tokens=32, reward="token_share"),
    "c-smol": RLWorkload("c-smol", "b", "grpo", prompts=4, num_generations=4, max_new_tokens=24, reward="vader"),
}


def workload(name: str) -> RLWorkload:
    """c-tiny, c-smol, or v-ppo-<length> / v-grpo-<length> (any length from 1 to 496), with -eosout: the length
    forced by an EOS id outside the vocabulary rather than min_new_tokens."""
    if name in FIXED:
        return FIXED[name]
    m = re.fullmatch(r"v-(ppo|grpo)-(\d+)(-eosout)?", name)
    if not m or not 1 <= int(m[2]) <= 496:
        raise argparse.ArgumentTypeError(f"unknown workload {name!r}: c-tiny, c-smol, v-ppo-<L>[-eosout] or "
                                         f"v-grpo-<L>[-eosout] (L = 1..496 response tokens)")
    algorithm, length = m[1], int(m[2])
    return RLWorkload(name, "v", algorithm, prompts=8 if algorithm == "ppo" else 2,
                      num_generations=1 if algorithm == "ppo" else 4, max_new_tokens=length, reward="token_share",
                      force_length=not m[3], eos_outside=bool(m[3]))


def runner_args() -> argparse.Namespace:
    """WORKLOAD [--steps N] [--warmup N] [--threads N] [--ops K]."""
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", type=workload)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--ops", type=int, default=0, help="after the timed steps, one more step under torch.profiler:"
                        " its K most expensive operators (self CPU time) and the matmul share go into the result")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def model_folder(w: RLWorkload, meta: dict, default):
    """The prepared model folder of the workload: `default`, or the EOS-outside-the-vocabulary copy."""
    from pathlib import Path

    return Path(meta["model"]["eos_outside"]) if w.eos_outside else default


def prompt_rows(w: RLWorkload, meta: dict) -> tuple[list[list[int]], list[str]]:
    """The step's prompts: the first w.prompts of the prepared ones (ids and text), each once."""
    return meta["prompt_ids"][:w.prompts], meta["prompts"][:w.prompts]


class StepClock:
    """Wall-clock and process CPU time of one step, and its phases as the runner marks them."""

    def __init__(self) -> None:
        self.t0, self.c0, self.phases = time.perf_counter(), time.process_time(), {}

    def done(self) -> dict:
        return {**self.phases, "total": time.perf_counter() - self.t0, "cpu": time.process_time() - self.c0}


def profile_summary(prof, k: int) -> dict:
    """The top-k operators by self CPU time and the share of the profiled step spent in matmul kernels."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:k]
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    return {"self_cpu_s_total": total / 1e6, "matmul_self_cpu_s": matmul / 1e6,
            "matmul_share": matmul / total if total else None,
            "top_ops": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in top]}


def summarise(w: RLWorkload, side: str, timings: list[dict], tokens: list[int], rewards: list[float],
              peak_mb: float) -> dict:
    """Medians over the timed steps: seconds per step (and each phase), episodes/s and generated tokens/s."""
    import transformers

    phases = {k: median(t[k] for t in timings) for k in timings[0]}
    return {"side": side, "workload": {**asdict(w), "batch_size": w.batch_size}, "timed_steps": len(timings),
            "median_step_s": phases["total"], "episodes_per_s": w.batch_size / phases["total"],
            "tokens_per_s": median(tokens) / phases["total"], "s_per_step": phases, "per_step": timings,
            "response_tokens_per_step": sum(tokens) / len(tokens), "reward_mean": sum(rewards) / len(rewards),
            "peak_rss_mb": peak_mb, "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "loadavg_end": os.getloadavg()}


__all__ = ["CURVE_LENGTHS", "RLWorkload", "StepClock", "model_folder", "peak_rss_mb", "profile_summary", "prompt_rows",
           "runner_args", "summarise", "workload"]
