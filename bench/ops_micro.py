"""The vocabulary-sized operations of one scoring micro-batch and one update, before and after (tether's .venv):

    OMP_NUM_THREADS=1 python bench/ops_micro.py [--repeats 15]

"before" are the straightforward formulas tether used until the performance work (written out below);
"after" are tether.ops as they are now. Shapes: one micro-batch of each workload, logits as the strided
(B, T, V) slice of a (B, T + 1, V) tensor, as the trainer gets them. Best of --repeats, milliseconds.
"""

import argparse
import time

import torch

from tether.ops.kl import kl_full
from tether.ops.logprobs import entropy_from_logits, gather_logprobs, token_stats

SHAPES = {"a": (16, 32, 4096), "b": (4, 24, 49152)}


def gather_before(logits, tokens):
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_before(logits):
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def kl_before(logits, ref_logits):
    logp, logq = torch.log_softmax(logits.float(), dim=-1), torch.log_softmax(ref_logits.float(), dim=-1)
    p = logp.exp()
    return (p * torch.where(p > 0, logp - logq, torch.zeros_like(logp))).sum(-1).clamp(min=0.0)


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, best of {args.repeats}, ms")
    print("| workload, (B, T, V) | operation | before | after |\n|---|---|---:|---:|")
    for name, (B, T, V) in SHAPES.items():
        full = 3 * torch.randn(B, T + 1, V, generator=g)
        ref_full = full + 0.3 * torch.randn(B, T + 1, V, generator=g)
        x, y, tokens = full[:, :-1], ref_full[:, :-1], torch.randint(V, (B, T), generator=g)
        grad_full = full.clone().requires_grad_()

        def backward(gather):
            def run():
                gather(grad_full[:, :-1], tokens).sum().backward()
                grad_full.grad = None
            return run

        with torch.no_grad():
            rows = [
                ("scoring: 3 gathers + kl_full + entropy",
                 lambda: (gather_before(x, tokens), gather_before(x, tokens), gather_before(y, tokens),
                          kl_before(x, y), entropy_before(x)),
                 lambda: token_stats(x, y, tokens)),
                ("kl_full (no grad)", lambda: kl_before(x, y), lambda: kl_full(x, y)),
                ("entropy_from_logits (no grad)", lambda: entropy_before(x), lambda: entropy_from_logits(x)),
            ]
            timed = [(label, best_ms(b, args.repeats), best_ms(a, args.repeats)) for label, b, a in rows]
        timed.append(("update: gather_logprobs forward + backward", best_ms(backward(gather_before), args.repeats),
                      best_ms(backward(gather_logprobs), args.repeats)))
        for label, before, after in timed:
            print(f"| ({name}) {(B, T, V)} | {label} | {before:.1f} | {after:.1f} |")


if __name__ == "__main__":
    main()
