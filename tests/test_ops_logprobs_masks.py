"""ops.logprobs and ops.masks: hand-computed values on tiny inputs, plus property tests.

Expected numbers are worked out in the comments with math.log / math.exp, never by calling
the function under test.
"""

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import assert_close64
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.ops.logprobs import entropy_from_logits, gather_logprobs
from tether.ops.masks import masked_mean, masked_var, masked_whiten, response_mask

NEG_INF = float("-inf")


close = functools.partial(assert_close64, atol=1e-6)


# ---------------------------------------------------------------------------- gather_logprobs


def test_gather_logprobs_hand_values():
    # logsumexp(1, 2, 3) = log(e + e^2 + e^3) = 3.4076
    # token 0: 1 - 3.4076 = -2.4076;  token 2: 3 - 3.4076 = -0.4076;  token 1: 2 - 3.4076 = -1.4076
    logits = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]], dtype=torch.float64)
    tokens = torch.tensor([[0, 2, 1]])
    close(gather_logprobs(logits, tokens), [[-2.4076059644, -0.4076059644, -1.4076059644]])


def test_gather_logprobs_ignores_filtered_tokens():
    # logits (0, 0, -inf, 0): the filtered token has p = 0, the rest 1/3 each -> log(1/3) = -1.0986
    # logits (ln 3, 0, -inf, -inf): p = (3/4, 1/4) -> token 1: log(1/4) = -1.3863
    logits = torch.tensor(
        [[0.0, 0.0, NEG_INF, 0.0], [math.log(3.0), 0.0, NEG_INF, NEG_INF]], dtype=torch.float64
    )
    tokens = torch.tensor([3, 1])
    close(gather_logprobs(logits, tokens), [-1.0986122887, -1.3862943611])


# ------------------------------------------------------------------------ entropy_from_logits


def test_entropy_uniform_over_four_is_log4():
    # H(uniform over 4) = log 4 = 1.3863; shifting all logits leaves it unchanged
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
    close(entropy_from_logits(logits), [1.3862943611, 1.3862943611], atol=1e-5)


def test_entropy_hand_values():
    # logits (0, ln 2): p = (1/3, 2/3), H = -(1/3 ln 1/3 + 2/3 ln 2/3) = 0.6365
    # logits (1, 2, 3): p_i = e^i / (e + e^2 + e^3), H = -sum p_i log p_i = 0.8324
    close(entropy_from_logits(torch.tensor([0.0, math.log(2.0)])), 0.6365141683, atol=1e-5)
    close(entropy_from_logits(torch.tensor([1.0, 2.0, 3.0])), 0.8323955818, atol=1e-5)


def test_entropy_with_filtered_tokens_is_finite_and_renormalised():
    # (0, ln 2, -inf, -inf) is (0, ln 2) renormalised: 0.6365 (not nan from 0 * -inf)
    # (1, -inf, 2, 3) is (1, 2, 3): 0.8324;  (5, -inf, -inf, -inf) is a point mass: 0
    logits = torch.tensor(
        [
            [0.0, math.log(2.0), NEG_INF, NEG_INF],
            [1.0, NEG_INF, 2.0, 3.0],
            [5.0, NEG_INF, NEG_INF, NEG_INF],
        ]
    )
    h = entropy_from_logits(logits)
    assert torch.isfinite(h).all()
    close(h, [0.6365141683, 0.8323955818, 0.0], atol=1e-5)


def _python_entropy(row: list[float]) -> float:
    finite = [x for x in row if x != NEG_INF]
    m = max(finite)
    z = sum(math.exp(x - m) for x in finite)
    ps = [math.exp(x - m) / z for x in finite]
    return -sum(p * math.log(p) for p in ps if p > 0)


def logit_rows(v: int):
    """Rows of v logits in [-8, 8], some -inf (as top-k / top-p leave them), at least one finite."""
    return st.lists(
        st.one_of(st.floats(-8.0, 8.0), st.just(NEG_INF)), min_size=v, max_size=v
    ).filter(lambda row: any(x != NEG_INF for x in row))


logit_batches = st.integers(2, 6).flatmap(lambda v: st.lists(logit_rows(v), min_size=1, max_size=4))


@settings(max_examples=100, deadline=None)
@given(rows=logit_batches)
def test_entropy_property_matches_renormalised_python(rows):
    logits = torch.tensor(rows, dtype=torch.float64)
    h = entropy_from_logits(logits)
    assert not torch.isnan(h).any()
    for got, row in zip(h.tolist(), rows):
        assert got == pytest.approx(_python_entropy(row), abs=1e-5)
        assert -1e-6 <= got <= math.log(sum(x != NEG_INF for x in row)) + 1e-5


# Gradients through filtered (-inf) logits must be finite and equal those of the renormalised
# distribution over the kept tokens (an entropy bonus over top-k / top-p logits must not turn nan).
def test_entropy_gradient_finite_with_filtered_tokens():
    logits = torch.tensor([1.0, 2.0, NEG_INF], requires_grad=True)
    entropy_from_logits(logits).backward()
    kept = torch.tensor([1.0, 2.0], requires_grad=True)
    entropy_from_logits(kept).backward()
    assert torch.isfinite(logits.grad).all()
    close(logits.grad[:2], kept.grad)
    assert logits.grad[2] == 0


def test_kl_full_gradient_finite_with_filtered_tokens():
    from tether.ops.kl import kl_full

    logits = torch.tensor([1.0, 2.0, NEG_INF], requires_grad=True)
    ref = torch.tensor([0.5, 0.0, 1.0])
    kl_full(logits, ref).backward()
    assert torch.isfinite(logits.grad).all()
    # reference gradient by hand-built formula: KL = sum_{v in S} p_v (log p_v - log q_v), p = softmax over S
    kept = torch.tensor([1.0, 2.0], requires_grad=True)
    p = torch.softmax(kept, -1)
    q = torch.softmax(ref, -1)[:2]
    (p * (p.log() - q.log())).sum().backward()
    close(logits.grad[:2], kept.grad)


# ------------------------------------------------------------------------------ response_mask


def test_response_mask_hand_values():
    responses = torch.tensor(
        [
            [5, 2, 7, 2],  # EOS at 1 -> counted, rest after it masked (incl. a second EOS)
            [2, 1, 1, 1],  # EOS first -> only the EOS itself
            [3, 4, 5, 6],  # no EOS -> all of it (truncated at max length)
        ]
    )
    expected = [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    for eos in (2, [2], torch.tensor([2])):
        m = response_mask(responses, eos)
        assert m.dtype.is_floating_point
        close(m, expected)


def test_response_mask_multiple_eos_ids():
    # EOS ids {2, 9}: whichever appears first ends the response
    responses = torch.tensor([[5, 9, 2, 1], [5, 6, 2, 9], [1, 1, 1, 1]])
    close(response_mask(responses, [2, 9]), [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    # with only 2 as EOS, the 9 in row 0 is an ordinary token
    close(response_mask(responses, 2), [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]])


def _python_response_mask(row: list[int], eos: set[int]) -> list[float]:
    out, done = [], False
    for tok in row:
        out.append(0.0 if done else 1.0)
        if tok in eos:
            done = True
    return out


@settings(max_examples=200, deadline=None)
@given(
    data=st.integers(1, 8).flatmap(
        lambda t: st.lists(st.lists(st.integers(0, 5), min_size=t, max_size=t), min_size=1, max_size=5)
    ),
    eos=st.sets(st.integers(0, 5), min_size=1, max_size=3),
)
def test_response_mask_property_matches_loop(data, eos):
    mask = response_mask(torch.tensor(data), sorted(eos))
    assert mask.shape == (len(data), len(data[0]))
    assert mask.tolist() == [_python_response_mask(row, eos) for row in data]


# ------------------------------------------------------------------- masked_mean / masked_var

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)


def test_masked_mean_hand_values():
    # all masked values: (1 + 2 + 4) / 3 = 2.3333;  per row: (1 + 2) / 2 = 1.5, 4 / 1 = 4
    close(masked_mean(X, M), 7 / 3)
    close(masked_mean(X, M, dim=1), [1.5, 4.0])
    # per column: (1 + 4) / 2 = 2.5, 2 / 1 = 2, empty column -> 0 (no division by zero)
    close(masked_mean(X, M, dim=0), [2.5, 2.0, 0.0])


def test_masked_var_hand_values():
    # values 1, 2, 4; mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9
    # biased: 42/9 / 3 = 14/9 = 1.5556;  unbiased: 42/9 / 2 = 7/3 = 2.3333
    close(masked_var(X, M, unbiased=False), 14 / 9)
    close(masked_var(X, M), 7 / 3)


def test_masked_var_unbiased_needs_two_values():
    one = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(X, one)
    close(masked_var(X, one, unbiased=False), 0.0)


# ------------------------------------------------------------------------------ masked_whiten


def test_masked_whiten_hand_values():
    # masked values 1, 2, 4: mean 7/3, unbiased std sqrt(7/3) = 1.5275
    # (1 - 7/3)/1.5275 = -0.8729; (2 - 7/3)/1.5275 = -0.2182; (4 - 7/3)/1.5275 = 1.0911
    w = masked_whiten(X, M)
    close(w, [[-0.8728715609, -0.2182178902, 0.0], [1.0910894512, 0.0, 0.0]])


def test_masked_whiten_keep_mean_hand_values():
    # shift_mean=False: add the mean 7/3 = 2.3333 back on the masked positions
    w = masked_whiten(X, M, shift_mean=False)
    close(w, [[-0.8728715609 + 7 / 3, -0.2182178902 + 7 / 3, 0.0], [1.0910894512 + 7 / 3, 0.0, 0.0]])


def _values_and_masks(max_width: int, min_rows: int, max_rows: int, mask_rows: int):
    """(rows of floats, rows of 0/1), every row of one width in 2..max_width."""
    return st.integers(2, max_width).flatmap(lambda t: st.tuples(
        st.lists(st.lists(st.floats(-50.0, 50.0), min_size=t, max_size=t), min_size=min_rows, max_size=max_rows),
        st.lists(st.lists(st.integers(0, 1), min_size=t, max_size=t), min_size=mask_rows, max_size=mask_rows),
    ))


@settings(max_examples=100, deadline=None)
@given(data=_values_and_masks(max_width=6, min_rows=1, max_rows=4, mask_rows=4))
def test_masked_whiten_property(data):
    xs, ms = data
    x = torch.tensor(xs, dtype=torch.float64)
    mask = torch.tensor(ms[: len(xs)], dtype=torch.float64)
    vals = [v for xrow, mrow in zip(xs, ms) for v, m in zip(xrow, mrow) if m]
    if len(vals) < 2:
        return
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    if var < 1e-2:  # (near-)constant data: whitening only divides by eps
        return
    for shift_mean, want_mean in ((True, 0.0), (False, mean)):
        w = masked_whiten(x, mask, shift_mean=shift_mean)
        wv = [v for wrow, mrow in zip(w.tolist(), ms) for v, m in zip(wrow, mrow) if m]
        w_mean = sum(wv) / len(wv)
        w_var = sum((v - w_mean) ** 2 for v in wv) / (len(wv) - 1)
        assert w_mean == pytest.approx(want_mean, abs=1e-6)
        assert w_var == pytest.approx(1.0, abs=1e-5)
        assert all(v == 0.0 for wrow, mrow in zip(w.tolist(), ms) for v, m in zip(wrow, mrow) if not m)


# -------------------------------------------------------- all_reduce: global statistics over split data
# Threads stand in for processes (tests/test_distributed.py runs real ones): each thread holds some rows, and
# the all_reduce sums what every thread passes to the same call.


class ThreadSum:
    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=10)  # a thread that raises breaks it instead of hanging
        self.slots: list = [None] * n

    def for_rank(self, rank: int):
        def all_reduce(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())  # same order on every thread
            self.barrier.wait()  # nobody overwrites a slot before all have read it
            return total
        return all_reduce


def _on_threads(fn, parts):
    """fn(x, mask, all_reduce) on each (x, mask) part, all at once, one thread per part."""
    reducer = ThreadSum(len(parts))
    with ThreadPoolExecutor(len(parts)) as pool:
        futures = [pool.submit(fn, x, m, reducer.for_rank(r)) for r, (x, m) in enumerate(parts)]
        return [f.result() for f in futures]


def test_all_reduce_hand_values_two_ranks():
    # rank 0 holds X's row 0 (values 1, 2), rank 1 row 1 (value 4): together 1, 2, 4 as in the tests above
    parts = [(X[:1], M[:1]), (X[1:], M[1:])]
    for got in _on_threads(lambda x, m, ar: masked_mean(x, m, all_reduce=ar), parts):
        close(got, 7 / 3)
    for got in _on_threads(lambda x, m, ar: masked_var(x, m, all_reduce=ar), parts):
        close(got, 7 / 3)  # Bessel with the global count 3: 42/9 / 2; rank 1 alone has 1 value and would raise
    for got in _on_threads(lambda x, m, ar: masked_var(x, m, unbiased=False, all_reduce=ar), parts):
        close(got, 14 / 9)
    w0, w1 = _on_threads(lambda x, m, ar: masked_whiten(x, m, all_reduce=ar), parts)
    close(torch.cat([w0, w1]), [[-0.8728715609, -0.2182178902, 0.0], [1.0910894512, 0.0, 0.0]])


def test_all_reduce_identity_is_the_plain_statistic():
    ident = lambda t: t  # noqa: E731
    close(masked_mean(X, M, all_reduce=ident), masked_mean(X, M))
    close(masked_var(X, M, all_reduce=ident), masked_var(X, M))
    close(masked_whiten(X, M, shift_mean=False, all_reduce=ident), masked_whiten(X, M, shift_mean=False))
    with pytest.raises(ValueError, match="dim=None"):
        masked_mean(X, M, dim=0, all_reduce=ident)


def test_all_reduce_keeps_bf16_counts_exact():
    # bf16 holds integers exactly only up to 256 (301 rounds to 300): the sum and count travel as float32
    x = torch.ones(301, dtype=torch.bfloat16)
    seen = []
    masked_mean(x, torch.ones_like(x), all_reduce=lambda t: seen.append(t.dtype) or t)
    assert seen == [torch.float32]


@settings(max_examples=60, deadline=None)
@given(data=_values_and_masks(max_width=5, min_rows=3, max_rows=6, mask_rows=6), n_ranks=st.integers(2, 3))
def test_all_reduce_split_equals_whole_property(data, n_ranks):
    xs, ms = data
    x = torch.tensor(xs, dtype=torch.float64)
    mask = torch.tensor(ms[: len(xs)], dtype=torch.float64)
    if mask.sum() < 2:
        return
    bounds = [round(i * len(xs) / n_ranks) for i in range(n_ranks + 1)]
    parts = [(x[a:b], mask[a:b]) for a, b in zip(bounds, bounds[1:])]
    for fn in (lambda x, m, ar: masked_mean(x, m, all_reduce=ar),
               lambda x, m, ar: masked_var(x, m, all_reduce=ar)):
        for got in _on_threads(fn, parts):
            close(got, fn(x, mask, None), atol=1e-9)
    for shift in (True, False):
        got = _on_threads(lambda x, m, ar: masked_whiten(x, m, shift_mean=shift, all_reduce=ar), parts)
        close(torch.cat(got), masked_whiten(x, mask, shift_mean=shift), atol=1e-9)
