"""Reward-model losses on hand-computed values."""

import math

import pytest
import torch
from conftest import assert_close64

from tether.losses.reward import bradley_terry_loss, regression_loss


def softplus(x):
    return math.log1p(math.exp(x))


def test_bradley_terry_hand_values():
    loss, stats = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    # -log sigma(2) = log(1 + e^-2) = 0.126928; -log sigma(0) = log 2
    assert_close64(loss, (softplus(-2.0) + math.log(2.0)) / 2)
    assert_close64(loss, 0.4100378, atol=1e-6)
    assert_close64(stats["accuracy"], 0.75)  # one win, one tie counted as half
    assert_close64(stats["margin_mean"], 1.0)
    assert_close64(stats["chosen_mean"], 1.0)
    assert_close64(stats["rejected_mean"], 0.0)


def test_margin_shifts_the_difference():
    loss, _ = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), margin=1.0)
    assert_close64(loss, (softplus(-1.0) + softplus(1.0)) / 2)  # 0.813262
    per_pair, _ = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert_close64(per_pair, (softplus(-1.0) + math.log(2.0)) / 2)


def test_gradient_is_minus_sigmoid_of_minus_difference():
    chosen = torch.tensor([2.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected)[0].backward()
    expected = [-torch.sigmoid(torch.tensor(-2.0)).item() / 2, -torch.sigmoid(torch.tensor(2.0)).item() / 2]
    assert_close64(chosen.grad, expected)
    assert_close64(rejected.grad, [-e for e in expected])


def test_no_overflow_for_large_differences():
    loss, stats = bradley_terry_loss(torch.tensor([-1000.0, 1000.0]), torch.tensor([0.0, 0.0]))
    assert_close64(loss, 500.0)  # (1000 + 0) / 2, where log(1 + e^1000) would overflow
    assert_close64(stats["accuracy"], 0.5)


def test_regression_hand_values():
    loss, stats = regression_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]))
    assert_close64(loss, 2.5)
    assert_close64(stats["label_mean"], 0.5)


@pytest.mark.parametrize("fn", [bradley_terry_loss, regression_loss])
def test_shapes_must_match(fn):
    with pytest.raises(ValueError, match="must both be"):
        fn(torch.zeros(3), torch.zeros(2))
