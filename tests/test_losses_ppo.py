"""losses.ppo: clipped policy / value losses and explained variance, on hand-worked examples."""

import functools
import math

import torch
from conftest import assert_close64

from tether.losses.ppo import explained_variance, policy_loss, value_loss

close = functools.partial(assert_close64, atol=1e-9)


# ---------------------------------------------------------------------------------- policy_loss

# cliprange 0.2 -> ratios are clipped to [0.8, 1.2]. Loss per token: max(-A r, -A clip(r)).
#  row 0 t0: r 1.5, A +1 -> max(-1.5, -1.2) = -1.2   clipped (no gradient)
#  row 0 t1: r 0.5, A +1 -> max(-0.5, -0.8) = -0.5   not clipped (pessimistic side)
#  row 0 t2: r 1.1, A -2 -> max( 2.2,  2.2) =  2.2   inside the range
#  row 0 t3: masked out (r 3, A 5)
#  row 1 t0: r 0.5, A -1 -> max( 0.5,  0.8) =  0.8   clipped (no gradient)
#  row 1 t1: r 1.0, A +3 -> max(-3.0, -3.0) = -3.0   inside the range
#  row 1 t2, t3: masked out
#  loss = (-1.2 - 0.5 + 2.2 + 0.8 - 3.0) / 5 = -1.7 / 5 = -0.34;  clipfrac = 2 / 5 = 0.4
RATIOS = [[1.5, 0.5, 1.1, 3.0], [0.5, 1.0, 2.0, 0.1]]
ADV = [[1.0, 1.0, -2.0, 5.0], [-1.0, 3.0, 1.0, 1.0]]
MASK = [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]


def _policy_inputs():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.5, -2.5, -0.2]], dtype=torch.float64)
    logprobs = (old + torch.log(torch.tensor(RATIOS, dtype=torch.float64))).requires_grad_(True)
    return logprobs, old, torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64)


def test_policy_loss_hand_values():
    logprobs, old, adv, mask = _policy_inputs()
    loss, stats = policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    close(loss.detach(), -0.34)
    close(stats["loss"], -0.34)
    close(stats["clipfrac"], 0.4)
    # approxkl = 0.5 * mean(log r ^ 2) = 0.5 * (ln1.5^2 + ln0.5^2 + ln1.1^2 + ln0.5^2 + 0) / 5
    #          = 0.5 * (0.16440 + 0.48045 + 0.00908 + 0.48045 + 0) / 5 = 0.11344
    close(stats["approxkl"], 0.1134392012)
    # policykl = mean(-log r) = (-ln1.5 - ln0.5 - ln1.1 - ln0.5 - 0) / 5
    #          = (-0.40547 + 0.69315 - 0.09531 + 0.69315 - 0) / 5 = 0.17710
    close(stats["policykl"], 0.1771038146)
    # ratio_mean = (1.5 + 0.5 + 1.1 + 0.5 + 1.0) / 5 = 0.92
    close(stats["ratio_mean"], 0.92)
    for v in stats.values():
        assert not v.requires_grad


def test_policy_loss_gradient_zero_at_clipped_and_masked_positions():
    logprobs, old, adv, mask = _policy_inputs()
    loss, _ = policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    loss.backward()
    # d/dlogp of -A r is -A r (dr/dlogp = r), averaged over 5 tokens:
    #   row 0 t1: -(1)(0.5)/5 = -0.1;  row 0 t2: -(-2)(1.1)/5 = 0.44;  row 1 t1: -(3)(1.0)/5 = -0.6
    #   clipped (row 0 t0, row 1 t0) and masked positions: 0
    close(logprobs.grad, [[0.0, -0.1, 0.44, 0.0], [0.0, -0.6, 0.0, 0.0]])


def test_policy_loss_weights_scale_the_loss_not_the_statistics():
    # a micro-batch holding a quarter of the minibatch's weight: weights = 0.25 * mask / 5
    logprobs, old, adv, mask = _policy_inputs()
    loss, stats = policy_loss(logprobs, old, adv, mask, cliprange=0.2, weights=0.25 * mask / 5)
    loss.backward()
    close(loss.detach(), -0.34 * 0.25)  # -0.085
    close(stats["loss"], -0.085)  # the loss's share: the shares of a minibatch's micro-batches add up
    # the diagnostics are token means under stat_weights (default: over the mask), not scaled
    close(stats["clipfrac"], 0.4)
    close(stats["approxkl"], 0.1134392012)
    close(logprobs.grad, [[0.0, -0.025, 0.11, 0.0], [0.0, -0.15, 0.0, 0.0]])  # grads x 0.25


def test_policy_loss_on_policy_is_minus_mean_advantage():
    # ratio 1 everywhere (first PPO epoch): loss = -mean(A) = -(1 - 2 + 4) / 3 = -1; nothing clipped
    lp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    loss, stats = policy_loss(lp, lp.detach(), torch.tensor([[1.0, -2.0, 4.0]]), torch.ones(1, 3), 0.2)
    close(loss.detach(), -1.0, atol=1e-6)
    close(stats["clipfrac"], 0.0)
    close(stats["approxkl"], 0.0)


# ----------------------------------------------------------------------------------- value_loss

# cliprange_value 0.2: V_clip = V_old + clip(V - V_old, -0.2, 0.2); per token max((V-R)^2, (V_clip-R)^2)
#  t0: V 1.0, old 0.5, R 2 -> V_clip 0.7; (1-2)^2 = 1,   (0.7-2)^2 = 1.69 -> 1.69  clipped
#  t1: V 0.5, old 0.4, R 0 -> V_clip 0.5; 0.25 both                        -> 0.25  in range
#  t2: V 0.0, old 0.5, R 2 -> V_clip 0.3; (0-2)^2 = 4,   (0.3-2)^2 = 2.89 -> 4     clip loses
#  t3: masked out
#  loss = 0.5 * (1.69 + 0.25 + 4) / 3 = 0.5 * 1.98 = 0.99;  clipfrac = 1/3;  vpred = 1.5/3 = 0.5


def _value_inputs():
    values = torch.tensor([[1.0, 0.5, 0.0, 9.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 0.4, 0.5, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 0.0, 2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    return values, old, returns, mask


def test_value_loss_hand_values():
    values, old, returns, mask = _value_inputs()
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    close(loss.detach(), 0.99)
    close(stats["loss"], 0.99)
    close(stats["clipfrac"], 1 / 3)
    close(stats["vpred"], 0.5)
    # explained variance over the mask: R = (2, 0, 2), V = (1, 0.5, 0), R - V = (1, -0.5, 2)
    #   Var[R] = mean((2/3)^2, (4/3)^2, (2/3)^2) = 24/27 = 0.8889
    #   Var[R-V] = mean((1/6)^2, (4/3)^2, (7/6)^2) = 114/108 = 1.0556
    #   1 - 1.0556 / 0.8889 = 1 - 1.1875 = -0.1875
    close(explained_variance(values.detach(), returns, mask), -0.1875)

    loss.backward()
    # d/dV of 0.5/3 * (V-R)^2 = (V-R)/3:  t1: 0.5/3 = 0.1667;  t2: -2/3 = -0.6667
    # t0 takes the clipped branch (V outside old +- 0.2): 0;  t3 masked: 0
    close(values.grad, [[0.0, 0.5 / 3, -2.0 / 3, 0.0]])


def test_value_loss_weights_scale_the_loss_not_the_statistics():
    values, old, returns, mask = _value_inputs()
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2, weights=2.0 * mask / 3)
    loss.backward()
    close(loss.detach(), 1.98)
    close(stats["loss"], 1.98)
    close(stats["clipfrac"], 1 / 3)
    close(values.grad, [[0.0, 1.0 / 3, -4.0 / 3, 0.0]])


# --------------------------------------------------------------------------- explained_variance


def test_explained_variance_hand_values():
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    # Var[target] over the mask = mean((-1.5)^2, (-0.5)^2, 0.5^2, 1.5^2) = 5/4 = 1.25
    # pred off by 1 at the last masked token: residual (0, 0, 0, -1):
    #   Var = mean(r^2) - mean(r)^2 = 1/4 - 1/16 = 0.1875;  EV = 1 - 0.1875/1.25 = 0.85
    # (the masked-out fifth position, off by 100, must not count)
    pred = torch.tensor([[1.0, 2.0, 3.0, 5.0, 0.0]], dtype=torch.float64)
    close(explained_variance(pred, target, mask), 0.85)
    # a perfect prediction -> 1; the constant mean 2.5 -> 0; the negated centred target -> 1 - 4 = -3
    close(explained_variance(target.clone(), target, mask), 1.0)
    close(explained_variance(torch.full_like(target, 2.5), target, mask), 0.0)
    close(explained_variance(5.0 - target, target, mask), -3.0)


def test_explained_variance_constant_target_is_nan():
    target = torch.tensor([[3.0, 3.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert math.isnan(explained_variance(torch.tensor([[1.0, 2.0, 3.0]]), target, mask).item())
