"""Run by tests/test_distributed.py as each of 2 processes (gloo on CPU); writes what it computed to
OUT/rank{r}.pt for the test to compare with one process holding all the data.

    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate/cpu_2proc.yaml \
        tests/dist/collectives.py OUT
"""

import sys
from pathlib import Path

import torch

B, T = 6, 7  # global batch: 6 rows, 3 per rank


def full_data() -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) float64 values and a response mask with ragged lengths, identical on every process."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, generator=g, dtype=torch.float64) * 3 + 1
    lengths = torch.tensor([7, 2, 5, 1, 3, 4])  # rank 0 holds 14 tokens, rank 1 holds 8: unequal counts
    mask = (torch.arange(T)[None] < lengths[:, None]).to(torch.float64)
    return x, mask


def local_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows, cut to its own padded width (as right-padding each rank's rollouts would)."""
    x, mask = full_data()
    rows = slice(rank * B // 2, (rank + 1) * B // 2)
    width = int(mask[rows].sum(-1).max())
    return x[rows, :width], mask[rows, :width]


def _error(fn) -> str | None:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def main(out: Path) -> None:
    from tether.collectives import Collectives, current_state, gather_lists, sum_all_reduce
    from tether.ops.masks import masked_mean, masked_var, masked_whiten
    from tether.partition import rank_minibatches

    state = current_state()  # as the launcher set it up: ACCELERATE_USE_CPU=true -> gloo on CPU
    r, n = state.process_index, state.num_processes
    ar = sum_all_reduce()
    x, mask = local_data(r)
    res: dict = {"num_processes": n, "distributed_type": str(state.distributed_type)}
    for name, kw in (("global", {"all_reduce": ar}), ("local", {})):
        res[name] = {
            "mean": masked_mean(x, mask, **kw),
            "var": masked_var(x, mask, **kw),
            "var_biased": masked_var(x, mask, unbiased=False, **kw),
            "whiten": masked_whiten(x, mask, **kw),
            "whiten_keep_mean": masked_whiten(x, mask, shift_mean=False, **kw),
        }
    # float32 values with a float32 mask (as in the trainer) go through the same path
    res["global32"] = masked_whiten(x.float(), mask.float(), all_reduce=ar)
    # unbiased variance: one value on each rank is 2 globally (fine); one value in all is an error on every rank
    one_each = torch.zeros_like(mask)
    one_each[0, 0] = 1
    res["var_one_each"] = masked_var(x, one_each, all_reduce=ar)
    res["var_one_total_error"] = _error(lambda: masked_var(x, one_each * (r == 0), all_reduce=ar))
    res["dim_error"] = _error(lambda: masked_mean(x, mask, dim=1, all_reduce=ar))

    res["gathered"] = gather_lists([f"rank{r}-item{i}" for i in range(r + 1)])  # 1 then 2 items
    res["gathered_kl"] = gather_lists([0.5 * r + i for i in range(3)])

    comm = Collectives(state)  # what a trainer holds as ranks.comm (its Accelerator in place of the state)
    res["comm"] = {"rank": comm.rank, "num": comm.num, "is_main": comm.is_main,
                   "sum": comm.all_reduce(torch.tensor([1.0 + r, 10.0])), "gather": comm.gather(torch.full((2,), r)),
                   "lists": comm.gather_lists([r] * (r + 1)), "any": comm.any(r == 1), "all": comm.all(r == 1),
                   "all_true": comm.all(True), "any_false": comm.any(False)}
    comm.wait()

    # a reward spec's running normaliser: every process's scores update the statistics (ragged: 2 and 3 rows,
    # a nan on rank 1 left out)
    from tether.rewards.compose import RunningNormalize

    scores = {0: [1.0, 2.0], 1: [4.0, float("nan"), 8.0, 16.0]}[r]
    norm = RunningNormalize(lambda prompts, completions: scores)
    res["normalised"] = norm([""] * len(scores), [""] * len(scores))
    res["moments"] = norm.state_dict()

    g = torch.Generator().manual_seed(5)
    res["minibatches"] = rank_minibatches(6, 2, g, r, n)
    res["generator_after"] = g.get_state()
    torch.save(res, out / f"rank{r}.pt")
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
