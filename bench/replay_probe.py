"""How the cost of replaying a contextual sampling rule (here min_new_tokens) in the update grows with the length:
tether's Sampler.sequence_scores + gather_logprobs, forward and backward, on random (B, T, V) logits, with
min_new_tokens = 0 (temperature only: the logits pass through) and min_new_tokens = T (the rule replayed at every
position, as the curve workloads force the length). One thread, best of 2, CPU seconds (tether's .venv):

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/replay_probe.py [--lengths 32 64 128] [--vocab 50000]
"""

import argparse
import time

import torch

from tether.ops import gather_logprobs
from tether.rollout import Sampler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--vocab", type=int, default=50000)
    parser.add_argument("--rows", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    B, V, P = args.rows, args.vocab, 16
    for T in args.lengths:
        for mnt in (0, T):
            sampler = Sampler([0], 1.0, 0, 1.0, mnt, 1.0, 0, ())  # eos 0, temperature 1, min_new_tokens mnt
            logits = torch.randn(B, T, V, requires_grad=True)
            ids = torch.randint(1, V, (B, P + T))
            best = float("inf")
            for _ in range(2):
                t0 = time.process_time()
                lp = gather_logprobs(sampler.sequence_scores(logits, ids, torch.ones_like(ids)), ids[:, P:])
                lp.sum().backward()
                logits.grad = None
                best = min(best, time.process_time() - t0)
            print(f"(B, T, V) = ({B}, {T}, {V}), min_new_tokens {mnt:4d}: forward + backward {best:.3f} CPU-s", flush=True)


if __name__ == "__main__":
    main()
