"""What both sides run: the workloads, the rewards, and small helpers shared by run_tether.py and run_trl.py.

Imports only torch and the standard library, so it loads in tether's .venv and in bench/.venv-trl alike.
The prepared inputs (model folders, prompt token ids) live in bench/results/<workload>/, written once by
prepare.py; both sides read the same token ids, so nothing depends on two tokenizer versions agreeing.
"""

import argparse
import json
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Workload:
    name: str
    batch_size: int  # = number of prompts; one generate call and one PPO step over all of them
    minibatch_size: int
    max_new_tokens: int
    reward: str  # "token_share" or "vader"
    ppo_epochs: int = 4
    learning_rate: float = 1.41e-5  # TRL 0.11's PPOConfig default, used on both sides
    init_kl_coef: float = 0.05  # fixed (non-adaptive) KL coefficient on both sides
    seed: int = 0


WORKLOADS = {
    "a": Workload("a", batch_size=64, minibatch_size=16, max_new_tokens=32, reward="token_share"),
    "b": Workload("b", batch_size=16, minibatch_size=4, max_new_tokens=24, reward="vader"),
}
REWARD_TOKEN = 7  # workload (a): the reward is the share of this token id among the response tokens


PRECISIONS = ("fp32", "bf16")  # fp32: no autocast; bf16: forward passes under bf16 autocast, fp32 weights and AdamW


def runner_args(compile_option: bool = False) -> tuple["Workload", int, str, bool]:
    """The command line both side runners take: WORKLOAD [--steps N] [--precision P], and with compile_option
    (tether's runner) [--compile] -> (workload, timed steps, precision, compile)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    if compile_option:
        parser.add_argument("--compile", action="store_true", help="PPOConfig(compile=True)")
    args = parser.parse_args()
    return WORKLOADS[args.workload], args.steps, args.precision, getattr(args, "compile", False)


class DtypeProbe:
    """Evidence of what precision the forward passes really ran in: a forward hook on the first transformer
    block's MLP of each model given counts its output dtype by phase and grad mode (bfloat16 under bf16 autocast,
    float32 without). `phase` is set by the runner ("generate", "step"); outside a phase nothing is counted."""

    def __init__(self, **models):
        self.phase: str | None = None
        self.seen: dict[str, dict[str, int]] = {}
        for name, model in models.items():
            mlp = next(m for n, m in model.named_modules() if n.endswith(".mlp"))
            mlp.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module, args, output):
            if self.phase is not None:
                key = f"{name} {self.phase}{'' if torch.is_grad_enabled() else ' (no grad)'}"
                dtype = str(getattr(output, "dtype", type(output).__name__)).removeprefix("torch.")
                counts = self.seen.setdefault(key, {})
                counts[dtype] = counts.get(dtype, 0) + 1
        return hook


def stored_dtypes(trained, reference, optimizer) -> dict[str, list[str]]:
    """dtypes of the trained weights, of the reference's weights and of the optimiser's state (AdamW moments)."""
    def names(tensors) -> list[str]:
        return sorted({str(t.dtype).removeprefix("torch.") for t in tensors})

    state = [v for s in optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]
    return {"weights": names(trained.parameters()), "reference_weights": names(reference.parameters()),
            "optimizer_state": names(state)}


def param_counts(model) -> tuple[int, int]:
    """(N_body, N_head): embeddings (token and position) and the LM head excluded from the body."""
    head = model.get_output_embeddings().weight
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    body = sum(p.numel() for p in model.parameters() if id(p) not in embeddings and p is not head)
    return body, head.numel()


def update_flops(model, B: int, P: int, T: int) -> int:
    """Model FLOPs of one forward + backward over B rows of P prompt and T response tokens (6 x params x tokens;
    only the response positions are projected onto the vocabulary, as tether does)."""
    body, head = param_counts(model)
    return 6 * (body * B * (P + T) + head * B * T)


def folder(workload: str) -> Path:
    return RESULTS / workload


def load_inputs(workload: str, side: str) -> tuple[Path, list[list[int]], dict]:
    """(model folder for this side, prompt token ids, prepared metadata incl. the logits checksum)."""
    meta_file = folder(workload) / "inputs.json"
    if not meta_file.exists():
        sys.exit(f"{meta_file} is missing: run `python bench/prepare.py` (tether's .venv) first")
    meta = json.loads(meta_file.read_text())
    return Path(meta["model"][side]), meta["prompt_ids"], meta


def token_share(responses: list[list[int]]) -> list[float]:
    """Reward (a): share of REWARD_TOKEN among each response's tokens (cheap, computed from ids)."""
    return [sum(t == REWARD_TOKEN for t in r) / max(len(r), 1) for r in responses]


def vader(texts: list[str]) -> list[float]:
    """Reward (b): VADER compound of the completion alone (what tether.demo.vader_reward computes)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = vader.__dict__.setdefault("analyzer", SentimentIntensityAnalyzer())
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


@torch.no_grad()
def logits_checksum(model, prompt_ids: list[list[int]]) -> float:
    """Sum of the first prompt's logits: equal on both sides iff both loaded the same weights the same way."""
    ids = torch.tensor([prompt_ids[0]])
    return float(model(input_ids=ids).logits.double().sum())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def progress(*parts) -> None:
    print("  [bench]", *parts, file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """The one machine-readable line compare.py looks for."""
    print("RESULT " + json.dumps(result), flush=True)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def summary(w: Workload, side: str, timings: list[dict], tokens: list[int], rewards: list[float]) -> dict:
    """Per-step medians of the phase timings -> episodes/s and generated tokens/s of wall-clock step time, and
    episodes per CPU-second of the process (all its threads). Every step's timings go along in `per_step`;
    compare.py's table uses the fastest step (see its `headline`)."""
    import transformers

    phases = {k: median(t[k] for t in timings) for k in timings[0]}
    total = phases["total"]
    return {
        "side": side, "workload": asdict(w), "timed_steps": len(timings),
        "episodes_per_s": w.batch_size / total,
        "tokens_per_s": median(tokens) / total,
        "episodes_per_cpu_s": w.batch_size / phases["cpu"],
        "s_per_step": phases, "per_step": timings,
        "response_tokens_per_step": mean(tokens),
        "reward_mean": mean(rewards),
        "peak_rss_mb": peak_rss_mb(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
