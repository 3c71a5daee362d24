"""This machine's fp32 (and with --precision bf16 also bf16) matrix-multiply throughput with torch, in GFLOP/s
(2 n^3 FLOPs per n x n product).

Square products at sizes around the workloads' widths (256 for the tiny GPT-2, 576/1536 for SmolLM2), best
of several repeats each; the best size is the "peak" compare.py measures tether's training phase against (the
bf16 peak when the run is in bf16: under autocast the matmuls take bf16 operands, as timed here).
    python bench/matmul.py [--sizes 256 512 1024 2048] [--repeats 20] [--precision bf16]
"""

import argparse
import time

import torch
from workloads import PRECISIONS, emit, progress


def gflops(n: int, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    inner = max(1, int(2e9 // (2 * n**3)))  # ~2 GFLOP per timing, so small sizes are not all call overhead
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16: measure the bf16 peak too (the fp32 one is always measured)")
    args = parser.parse_args()
    gflops(1024, 3)  # wake the thread pool and the vector units before anything is recorded
    by_size = {}
    for n in args.sizes:
        by_size[n] = gflops(n, args.repeats)
        progress(f"matmul {n}x{n} fp32: {by_size[n]:.1f} GFLOP/s")
    result = {"side": "matmul", "gflops_by_size": by_size, "peak_gflops": max(by_size.values()),
              "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if args.precision == "bf16":
        gflops(1024, 3, torch.bfloat16)
        bf16 = {}
        for n in args.sizes:
            bf16[n] = gflops(n, args.repeats, torch.bfloat16)
            progress(f"matmul {n}x{n} bf16: {bf16[n]:.1f} GFLOP/s")
        result.update({"bf16_gflops_by_size": bf16, "bf16_peak_gflops": max(bf16.values())})
    emit(result)


if __name__ == "__main__":
    main()
