"""tether.collectives, tether.partition and the all_reduce path of ops.masks, on 2 real processes (gloo, CPU).

One `accelerate launch` with examples/accelerate/cpu_2proc.yaml runs tests/dist/collectives.py as 2 processes
(about 7 s on 2 cores); each writes what it computed, and the tests below compare that with one process
holding the whole batch.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tether.collectives import gather_lists, sum_all_reduce
from tether.distributed import Ranks
from tether.ops.masks import masked_mean, masked_var, masked_whiten
from tether.partition import check_sizes, rank_minibatches

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from collectives import B, full_data  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "examples/accelerate/cpu_2proc.yaml"),
           "--main_process_port", str(_free_port()), str(ROOT / "tests/dist/collectives.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_launch_gives_two_gloo_processes(ranks):
    for res in ranks:
        assert res["num_processes"] == 2
        assert res["distributed_type"].endswith("MULTI_CPU")


def test_global_masked_stats_equal_one_process_on_all_data(ranks):
    x, mask = full_data()
    want = {"mean": masked_mean(x, mask), "var": masked_var(x, mask), "var_biased": masked_var(x, mask, unbiased=False)}
    for res in ranks:
        for k, v in want.items():
            close(res["global"][k], v)
    for name, kw in (("whiten", {}), ("whiten_keep_mean", {"shift_mean": False})):
        whole = masked_whiten(x, mask, **kw)
        # each rank's rows, at its own padded width; the columns cut off are outside the mask anyway
        got = torch.zeros_like(whole)
        for r, res in enumerate(ranks):
            w = res["global"][name]
            got[r * B // 2:(r + 1) * B // 2, :w.shape[1]] = w
        close(got, whole)


def test_without_all_reduce_each_rank_whitens_differently(ranks):
    # the check above can fail: per-rank statistics are not the global ones on this data
    x, mask = full_data()
    whole_mean, whole_var = masked_mean(x, mask), masked_var(x, mask)
    for res in ranks:
        assert abs(res["local"]["mean"] - whole_mean) > 0.1
        assert abs(res["local"]["var"] - whole_var) > 0.1
        assert not torch.allclose(res["local"]["whiten"], res["global"]["whiten"], atol=1e-3)


def test_global_whiten_float32(ranks):
    x, mask = full_data()
    whole = masked_whiten(x, mask)
    for r, res in enumerate(ranks):
        w = res["global32"]
        assert w.dtype == torch.float32
        torch.testing.assert_close(w.double(), whole[r * B // 2:(r + 1) * B // 2, :w.shape[1]], atol=1e-5, rtol=0)


def test_bessel_correction_uses_the_global_count(ranks):
    # one masked value on each rank: 2 in all, so the unbiased variance exists (and is the same on both ranks);
    # one value in all is an error on every rank, not only on the rank that holds it
    x, _ = full_data()
    pair = torch.stack([x[0, 0], x[B // 2, 0]])
    for res in ranks:
        close(res["var_one_each"], pair.var(unbiased=True))
        assert "at least 2" in res["var_one_total_error"]
        assert "dim=None" in res["dim_error"]


def test_gather_lists_keeps_rank_order_and_ragged_lengths(ranks):
    for res in ranks:
        assert res["gathered"] == ["rank0-item0", "rank1-item0", "rank1-item1"]
        assert res["gathered_kl"] == [0.0, 1.0, 2.0, 0.5, 1.5, 2.5]


def test_collectives_class_sums_gathers_and_decides_together(ranks):
    for r, res in enumerate(ranks):
        c = res["comm"]
        assert (c["rank"], c["num"], c["is_main"]) == (r, 2, r == 0)
        assert c["sum"].tolist() == [3.0, 20.0]
        assert c["gather"].tolist() == [0, 0, 1, 1]
        assert c["lists"] == [0, 1, 1]
        assert (c["any"], c["all"], c["all_true"], c["any_false"]) == (True, False, True, False)


def test_reward_spec_normaliser_uses_every_process_scores(ranks):
    from tether.rewards.compose import RunningNormalize

    one = RunningNormalize(lambda prompts, completions: [1.0, 2.0, 4.0, float("nan"), 8.0, 16.0])
    one([""] * 6, [""] * 6)
    for res in ranks:
        for k, v in one.state_dict().items():
            close(res["moments"][k], v)
    everything = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64)
    mean, std = everything.mean(), everything.std(unbiased=False)
    for got, want in ((ranks[0]["normalised"], [1.0, 2.0]), (ranks[1]["normalised"][2:], [8.0, 16.0])):
        want = (torch.tensor(want, dtype=torch.float64) - mean) / std  # the scores themselves are float32
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-6, atol=1e-6)


def test_rank_minibatches_partition_the_global_batch(ranks):
    # same generator state after the draw on both ranks; k-th pieces together are a global minibatch of 4 rows,
    # and all pieces together cover each rank's 6 local rows once
    assert torch.equal(ranks[0]["generator_after"], ranks[1]["generator_after"])
    for res in ranks:
        assert [len(p) for p in res["minibatches"]] == [2, 2, 2]
        assert sorted(torch.cat(res["minibatches"]).tolist()) == list(range(6))
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0]["minibatches"], ranks[1]["minibatches"]))


# ---- one process: everything is a no-op that changes nothing -------------------------------------------------


def test_single_process_is_identity():
    # an explicit state: creating the process-wide PartialState here would pin it for later tests in this session
    one = SimpleNamespace(num_processes=1, process_index=0)
    x, mask = full_data()
    ar = sum_all_reduce(one)
    close(masked_whiten(x, mask, all_reduce=ar), masked_whiten(x, mask))
    assert gather_lists(("p", "q"), state=one) == ["p", "q"]


def test_one_process_ranks_hold_identity_collectives(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = Ranks(cpu=True)
    comm = ranks.comm
    assert (ranks.rank, ranks.num, ranks.is_main) == (comm.rank, comm.num, comm.is_main) == (0, 1, True)
    assert comm.device is None and ranks.device is None
    x = torch.arange(3.0)
    assert comm.all_reduce(x) is x and comm.gather(x) is x
    assert comm.gather_lists(("p", "q")) == ["p", "q"]
    assert comm.any(True) and not comm.any(False) and comm.all(True) and not comm.all(False)
    comm.wait()


def test_rank_minibatches_one_process_is_the_old_partition():
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = rank_minibatches(8, 2, a, rank=0, num_processes=1)
    want = list(torch.randperm(8, generator=b).split(2))  # trainers/batching.minibatches
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_check_sizes():
    assert check_sizes(32, 8, 4, gradient_accumulation_steps=2) == (8, 2)
    with pytest.raises(ValueError, match="batch_size=30 is global"):
        check_sizes(30, 10, 4)
    with pytest.raises(ValueError, match="minibatch_size=6 is global"):
        check_sizes(32, 6, 4)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        check_sizes(32, 8, 4, gradient_accumulation_steps=4)
    assert check_sizes(32, 8, 4, group_size=4) == (8, 2)
    with pytest.raises(ValueError, match="split a group of num_generations=4"):
        check_sizes(24, 8, 4, group_size=4)  # 6 rollouts per process: the second group of 4 would straddle
