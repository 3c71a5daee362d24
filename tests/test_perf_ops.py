"""The faster paths of ops.logprobs / ops.kl / Sampler.sequence_scores give the same numbers as the plain ones.

References are the textbook formulas written out here with autograd (the implementations before the
performance work), in float64 where the comparison is about values.
"""

import math

import pytest
import torch
from conftest import assert_close64

from tether.ops.kl import kl_full
from tether.ops.logprobs import entropy_from_logits, gather_logprobs, token_stats
from tether.rollout.sampling import Sampler

NEG_INF = float("-inf")


def _ref_gather(logits, tokens):
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _ref_entropy(logits):
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def _ref_kl(logits, ref_logits):
    logp, logq = torch.log_softmax(logits, dim=-1), torch.log_softmax(ref_logits, dim=-1)
    p = logp.exp()
    return (p * torch.where(p > 0, logp - logq, torch.zeros_like(logp))).sum(-1).clamp(min=0.0)


def _filtered(shape, seed, dtype=torch.float32):
    """Random logits with about a third of each row filtered to -inf (never a whole row)."""
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*shape, generator=g, dtype=dtype)
    drop = torch.rand(*shape, generator=g) < 0.35
    drop[..., 0] = False
    return x.masked_fill(drop, NEG_INF)


# ------------------------------------------------------------------- gather_logprobs' fused backward


def test_gather_logprobs_gradient_hand_values():
    # x = (0, ln 3): softmax = (1/4, 3/4); d log p(token 1) / dx = onehot(1) - softmax = (-1/4, 1/4)
    x = torch.tensor([0.0, math.log(3.0)], requires_grad=True)
    gather_logprobs(x, torch.tensor(1)).backward()
    assert_close64(x.grad, [-0.25, 0.25], atol=1e-7)


def test_gather_logprobs_gradient_equals_autograd_on_a_strided_slice():
    full = _filtered((3, 6, 50), seed=0).requires_grad_()
    tokens = torch.randint(50, (3, 5), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    got = gather_logprobs(full[:, :-1], tokens)  # the trainer's logits are a slice, like this one
    (got * weights).sum().backward()
    grad, full.grad = full.grad.clone(), None
    want = _ref_gather(full[:, :-1], tokens)
    (want * weights).sum().backward()
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert_close64(got[torch.isfinite(got)], want[torch.isfinite(want)], atol=1e-6)
    assert_close64(grad, full.grad, atol=1e-6)
    assert torch.isfinite(grad).all()


def test_gather_logprobs_gradcheck_float64():
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(7, (2, 3), generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(lambda t: gather_logprobs(t, tokens), (x,))


# --------------------------------------------------------------------- no-grad entropy and kl_full


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_grad_entropy_and_kl_equal_the_autograd_formulas(seed):
    x, y = _filtered((4, 3, 64), seed), 3 * torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(seed + 9))
    with torch.no_grad():
        assert_close64(entropy_from_logits(x), _ref_entropy(x), atol=1e-6)
        assert_close64(kl_full(x, y), _ref_kl(x, y), atol=1e-6)
    # and against float64 (the float32 paths only differ by round-off)
    assert_close64(kl_full(x, y), _ref_kl(x.double(), y.double()), atol=1e-5)


def test_no_grad_kl_full_identical_logits_is_exactly_zero():
    x = 3 * torch.randn(2, 5, 33, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(kl_full(x, x.clone()), torch.zeros(2, 5))
    assert torch.equal(token_stats(x, x.clone(), torch.zeros(2, 5, dtype=torch.long)).kl, torch.zeros(2, 5))


def test_no_grad_paths_leave_inputs_untouched():
    x, y = _filtered((2, 3, 20), seed=4), torch.randn(2, 3, 20)
    x0, y0 = x.clone(), y.clone()
    with torch.no_grad():
        entropy_from_logits(x), kl_full(x, y), token_stats(x, y, torch.zeros(2, 3, dtype=torch.long))
    assert torch.equal(x, x0) and torch.equal(y, y0)


# ---------------------------------------------------------------------------------- token_stats


def test_token_stats_hand_values():
    # pi = softmax(0, -inf, 0) = (1/2, 0, 1/2); ref = uniform(1/3); token 0
    # log pi(0) = ln 1/2, log ref(0) = ln 1/3, H = ln 2, KL = 2 * 1/2 ln(1/2 / 1/3) = ln 1.5
    s = token_stats(torch.tensor([[0.0, NEG_INF, 0.0]]), torch.zeros(1, 3), torch.tensor([0]))
    assert_close64(s.logprobs, [math.log(0.5)], atol=1e-7)
    assert_close64(s.ref_logprobs, [math.log(1 / 3)], atol=1e-7)
    assert_close64(s.entropy, [math.log(2.0)], atol=1e-7)
    assert_close64(s.kl, [math.log(1.5)], atol=1e-7)


def test_token_stats_filtered_sampled_token_scores_minus_inf():
    s = token_stats(torch.tensor([[0.0, NEG_INF, 0.0]]), torch.zeros(1, 3), torch.tensor([1]))
    assert s.logprobs.item() == NEG_INF  # the trainer's support-flip check relies on it
    assert torch.isfinite(s.kl).all() and torch.isfinite(s.entropy).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_token_stats_equals_the_separate_functions(seed):
    g = torch.Generator().manual_seed(seed)
    scores = _filtered((3, 7, 101), seed)[:, :-1]  # strided, as the trainer's slices are
    ref = (3 * torch.randn(3, 7, 101, generator=g))[:, 1:]
    tokens = torch.randint(101, (3, 6), generator=g)
    s = token_stats(scores, ref, tokens)
    assert s.logprobs.shape == s.ref_logprobs.shape == s.entropy.shape == s.kl.shape == (3, 6)
    want = _ref_gather(scores, tokens)
    assert torch.equal(torch.isfinite(s.logprobs), torch.isfinite(want))
    assert_close64(s.logprobs[torch.isfinite(want)], want[torch.isfinite(want)], atol=1e-6)
    assert_close64(s.ref_logprobs, _ref_gather(ref, tokens), atol=1e-6)
    assert_close64(s.entropy, _ref_entropy(scores), atol=1e-6)
    assert_close64(s.kl, _ref_kl(scores, ref), atol=1e-6)
    assert_close64(s.kl, _ref_kl(scores.double(), ref.double()), atol=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 4, 5, 17, 1000])
def test_token_stats_chunked_equals_unchunked(chunk_rows):
    scores, ref = _filtered((3, 6, 80), seed=5), torch.randn(3, 6, 80)
    tokens = torch.randint(80, (3, 6), generator=torch.Generator().manual_seed(6))
    whole, chunked = token_stats(scores, ref, tokens), token_stats(scores, ref, tokens, chunk_rows=chunk_rows)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_token_stats_does_not_track_gradients():
    scores = torch.randn(2, 3, 10, requires_grad=True)
    s = token_stats(scores, torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.long))
    assert not any(t.requires_grad for t in s)


# ------------------------------------------------------------------- sequence_scores fast path


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_temperature_only_replay_equals_the_generic_warper_loop(temperature):
    sampler = Sampler([0], temperature=temperature)
    full = torch.randn(2, 5, 30)
    logits = full[:, :-1]  # strided
    ids, mask = torch.randint(30, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    got = sampler.sequence_scores(logits, ids, mask)
    want = sampler._rowwise(logits.reshape(8, 30)).reshape(2, 4, 30)
    assert torch.equal(got, want)
    for t in range(4):
        assert torch.equal(got[:, t], sampler.step_scores(logits[:, t], ids[:, : 3 + t], mask[:, : 3 + t], t))


def test_temperature_one_replay_keeps_the_gradient_path():
    sampler = Sampler([0])
    logits = torch.randn(2, 4, 9, requires_grad=True)
    sampler.sequence_scores(logits, torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6)).sum().backward()
    assert torch.equal(logits.grad, torch.ones(2, 4, 9))


def test_token_stats_single_position():
    s = token_stats(torch.tensor([0.0, 1.0, 2.0]), torch.zeros(3), torch.tensor(2))
    assert s.logprobs.shape == ()
    assert_close64(s.logprobs, _ref_gather(torch.tensor([0.0, 1.0, 2.0]), torch.tensor(2)), atol=1e-7)
    assert_close64(s.ref_logprobs, math.log(1 / 3), atol=1e-7)
