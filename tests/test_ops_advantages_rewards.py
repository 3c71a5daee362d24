"""ops.advantages (GAE) and ops.rewards (shape_rewards, RunningMoments)."""

import functools

import numpy as np
import pytest
import torch
from conftest import assert_close64
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.ops.advantages import gae
from tether.ops.rewards import RunningMoments, shape_rewards

close = functools.partial(assert_close64, atol=1e-9)


# ------------------------------------------------------------------------------------------ gae


def test_gae_hand_values():
    rewards = torch.tensor([[0.0, 1.0, 5.0], [1.0, 0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.2, 9.0], [0.5, 1.0, 1.5]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)

    # row 0, gamma 0.9, lam 0.8, episode ends at t = 1 (the 5.0 reward and 9.0 value are padding)
    #   t=1: delta = 1 + 0 - 0.2 = 0.8                  A1 = 0.8
    #   t=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32          A0 = -0.32 + 0.9*0.8*0.8 = 0.256
    #   returns = A + V = (0.756, 1.0, 0)
    adv, ret = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.8)
    close(adv, [[0.256, 0.8, 0.0]])
    close(ret, [[0.756, 1.0, 0.0]])

    # row 1, gamma = lam = 1: A_t = sum of rewards from t on - V_t (Monte Carlo return - V)
    #   A = (1+0+2 - 0.5, 0+2 - 1, 2 - 1.5) = (2.5, 1.0, 0.5);  returns = (3, 2, 2)
    adv, ret = gae(rewards[1:], values[1:], mask[1:], gamma=1.0, lam=1.0)
    close(adv, [[2.5, 1.0, 0.5]])
    close(ret, [[3.0, 2.0, 2.0]])

    # lam = 0: one-step TD errors. row 1, gamma 0.5:
    #   t=2: 2 - 1.5 = 0.5;  t=1: 0 + 0.5*1.5 - 1 = -0.25;  t=0: 1 + 0.5*1 - 0.5 = 1.0
    adv, _ = gae(rewards[1:], values[1:], mask[1:], gamma=0.5, lam=0.0)
    close(adv, [[1.0, -0.25, 0.5]])


def _gae_loop(rewards: list[float], values: list[float], length: int, gamma: float, lam: float):
    """Textbook GAE on one episode of `length` steps, terminal after the last (no bootstrap)."""
    adv = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    ret = [adv[t] + values[t] if t < length else 0.0 for t in range(len(rewards))]
    return adv, ret


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    t_max=st.integers(1, 8),
    extra_lengths=st.lists(st.integers(1, 8), min_size=0, max_size=3),
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.0, 1.0),
)
def test_gae_matches_python_loop(seed, t_max, extra_lengths, gamma, lam):
    # always a full row and a length-1 row, plus random lengths
    lengths = [t_max, 1] + [min(n, t_max) for n in extra_lengths]
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    # values outside the mask are large garbage: they must not leak into the result
    rewards = torch.randn(B, t_max, generator=gen, dtype=torch.float64) * 3
    values = torch.randn(B, t_max, generator=gen, dtype=torch.float64) * 3
    mask = torch.tensor([[1.0] * n + [0.0] * (t_max - n) for n in lengths], dtype=torch.float64)
    rewards = torch.where(mask > 0, rewards, torch.full_like(rewards, 1e3))
    values = torch.where(mask > 0, values, torch.full_like(values, -1e3))

    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert adv.shape == ret.shape == (B, t_max)
    for b, n in enumerate(lengths):
        want_adv, want_ret = _gae_loop(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b].tolist() == pytest.approx(want_adv, abs=1e-9)
        assert ret[b].tolist() == pytest.approx(want_ret, abs=1e-9)
    outside = mask == 0
    assert (adv[outside] == 0).all()
    assert (ret[outside] == 0).all()


# -------------------------------------------------------------------------------- shape_rewards


def test_shape_rewards_hand_values():
    scores = torch.tensor([2.0, -1.0], dtype=torch.float64)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    rewards, non_score = shape_rewards(scores, kl, mask, kl_coef=0.5)
    # non_score = -0.5 * kl on masked tokens: row 0 (-0.05, -0.1, 0), row 1 (-0.2, 0, 0)
    close(non_score, [[-0.05, -0.1, 0.0], [-0.2, 0.0, 0.0]])
    # score on the last masked token: row 0 t=1: -0.1 + 2 = 1.9;  row 1 t=0: -0.2 - 1 = -1.2
    close(rewards, [[-0.05, 1.9, 0.0], [-1.2, 0.0, 0.0]])


def test_shape_rewards_full_mask_score_on_final_token():
    # mask covers all 3 tokens: score 1 lands on t = 2: (-0.1*1, -0.1*2, -0.1*3 + 1)
    rewards, _ = shape_rewards(
        torch.tensor([1.0]), torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), kl_coef=0.1
    )
    close(rewards, [[-0.1, -0.2, 0.7]], atol=1e-6)


def test_shape_rewards_does_not_modify_inputs():
    kl = torch.tensor([[0.1, 0.2]])
    mask = torch.ones(1, 2)
    shape_rewards(torch.tensor([5.0]), kl, mask, kl_coef=1.0)
    close(kl, [[0.1, 0.2]], atol=1e-7)


def test_shape_rewards_rejects_empty_mask_row():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="at least one token"):
        shape_rewards(torch.tensor([1.0, 2.0]), torch.zeros(2, 2), mask, kl_coef=0.1)


# ------------------------------------------------------------------------------- RunningMoments


def test_running_moments_matches_numpy_over_updates():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=n) for n in (1, 5, 17, 64, 2)]
    rm = RunningMoments()
    for i, chunk in enumerate(chunks):
        rm.update(torch.tensor(chunk, dtype=torch.float64).reshape(-1, 1))  # any shape is flattened
        seen = np.concatenate(chunks[: i + 1])
        assert rm.count == len(seen)
        assert rm.mean == pytest.approx(np.mean(seen), rel=1e-12)
        assert rm.var == pytest.approx(np.var(seen), rel=1e-12)
        assert rm.std == pytest.approx(np.std(seen), rel=1e-12)


def test_running_moments_hand_values_and_empty_update():
    # (1, 3) then (5,): data 1, 3, 5 -> mean 3, population var (4 + 0 + 4)/3 = 8/3
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 3.0]))
    assert (rm.mean, rm.var, rm.count) == pytest.approx((2.0, 1.0, 2.0))
    rm.update(torch.tensor([]))  # no-op
    rm.update(torch.tensor([5.0]))
    assert (rm.mean, rm.var, rm.count) == pytest.approx((3.0, 8 / 3, 3.0))


def test_running_moments_state_dict_round_trip():
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 3.0, 8.0]))
    other = RunningMoments()
    other.load_state_dict(rm.state_dict())
    assert (other.mean, other.var, other.count) == (rm.mean, rm.var, rm.count)
    # both continue identically
    rm.update(torch.tensor([2.0]))
    other.update(torch.tensor([2.0]))
    assert (other.mean, other.var, other.count) == (rm.mean, rm.var, rm.count)
