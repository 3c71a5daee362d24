"""The rollout correction's weights and the engine/trainer mismatch statistics, by hand (losses/correction.py)."""

import math

import pytest
import torch
from conftest import assert_close64

from tether.losses.correction import correction_weights, mismatch_stats

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
# log rho = log pi_old - log mu per token: rho = 0.5, 1.5, 3 | 1.2, 2.5 (the last columns are padding)
LOG_RHO = torch.log(torch.tensor([[0.5, 1.5, 3.0, 7.0], [1.2, 2.5, 9.0, 9.0]]))
MU = torch.full((2, 4), -2.0)
PI = MU + LOG_RHO


def test_token_truncated_weights_cap_each_token():
    weights, capped = correction_weights(PI, MU, MASK, level="token", bound="tis", cap=2.0)
    assert_close64(weights, [[0.5, 1.5, 2.0, 1.0], [1.2, 2.0, 1.0, 1.0]], atol=1e-6)  # 1 outside the mask
    assert capped.tolist() == [[False, False, True, False], [False, True, False, False]]


def test_token_masked_weights_drop_tokens_above_the_cap():
    weights, _ = correction_weights(PI, MU, MASK, level="token", bound="mis", cap=2.0)
    assert_close64(weights, [[0.5, 1.5, 0.0, 1.0], [1.2, 0.0, 1.0, 1.0]], atol=1e-6)


def test_sequence_weights_are_the_product_of_the_tokens():
    weights, capped = correction_weights(PI, MU, MASK, level="sequence", bound="tis", cap=4.0)
    # row 0: 0.5 * 1.5 * 3 = 2.25 (under the cap); row 1: 1.2 * 2.5 = 3.0
    assert_close64(weights, [[2.25, 2.25, 2.25, 1.0], [3.0, 3.0, 1.0, 1.0]], atol=1e-5)
    weights, capped = correction_weights(PI, MU, MASK, level="sequence", bound="mis", cap=2.5)
    assert_close64(weights, [[2.25, 2.25, 2.25, 1.0], [0.0, 0.0, 1.0, 1.0]], atol=1e-5)
    assert capped[1, :2].all() and not capped[0].any()


def test_weights_carry_no_gradient():
    pi = PI.clone().requires_grad_()
    weights, _ = correction_weights(pi, MU, MASK, level="token", bound="tis", cap=2.0)
    assert not weights.requires_grad


def test_mismatch_statistics_by_hand():
    flipped = torch.tensor([[False, True, False, True], [False, False, False, False]])
    stats = mismatch_stats(PI, MU, MASK, flipped)
    rho = [0.5, 1.5, 3.0, 1.2, 2.5]
    k3 = sum(r - 1 - math.log(r) for r in rho) / 5  # KL(mu || pi_old) estimated on tokens drawn from mu
    assert_close64(stats["mismatch_kl"], k3, atol=1e-6)
    assert_close64(stats["mismatch_max_gap"], math.log(3.0), atol=1e-6)  # padding (log 9) does not count
    assert_close64(stats["outside_support"], 1 / 5)  # the flipped padding position does not count


def test_equal_logprobs_give_weights_one_and_no_mismatch():
    weights, capped = correction_weights(MU, MU, MASK, level="token", bound="tis", cap=2.0)
    assert torch.equal(weights, torch.ones_like(weights)) and not capped.any()
    stats = mismatch_stats(MU, MU, MASK, torch.zeros_like(MASK, dtype=torch.bool))
    assert stats["mismatch_kl"] == 0 and stats["mismatch_max_gap"] == 0


@pytest.mark.parametrize("bound", ["tis", "mis"])
def test_extreme_gaps_stay_finite(bound):
    pi = MU.clone()
    pi[0, 0] = 500.0  # a log-ratio far beyond any float's exp
    weights, _ = correction_weights(pi, MU, MASK, level="sequence", bound=bound, cap=2.0)
    assert torch.isfinite(weights).all()
    assert torch.isfinite(mismatch_stats(pi, MU, MASK, torch.zeros_like(MASK, dtype=torch.bool))["mismatch_kl"])
