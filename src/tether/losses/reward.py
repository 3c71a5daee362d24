"""Reward-model losses: pairwise (Bradley-Terry) on preference pairs, squared error on scalar labels.

Both are pure functions of scores and return (loss, stats) with detached stats, like losses/ppo.py.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    chosen: Tensor,  # (B,) r(x, y_chosen), with grad
    rejected: Tensor,  # (B,) r(x, y_rejected), with grad
    margin: Tensor | float = 0.0,  # (B,) or scalar m: how much chosen must beat rejected by
) -> tuple[Tensor, dict[str, Tensor]]:
    """-log sigma(r_c - r_r - m), averaged over pairs.

    Bradley & Terry (1952): P(chosen > rejected) = sigma(r_c - r_r); its negative log-likelihood is the
    reward-model loss of Ziegler et al. 2019 and InstructGPT (Ouyang et al. 2022, eq. 1). The margin is
    Llama 2's (Touvron et al. 2023, eq. 2): a pair rated "clearly better" must be separated by m before its
    loss falls like an unmarginned pair's. softplus(-x) = -log sigma(x) without overflow for large |x|.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must both be (B,), got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    diff = chosen - rejected
    loss = F.softplus(-(diff - margin)).mean()
    with torch.no_grad():
        stats = {
            # a tie is a coin flip, not a win: a constant reward model scores 0.5, not 0 or 1
            "accuracy": ((diff > 0).float() + 0.5 * (diff == 0).float()).mean(),
            "margin_mean": diff.mean(),
            "chosen_mean": chosen.mean(),
            "rejected_mean": rejected.mean(),
            "loss": loss.detach(),
        }
    return loss, stats


def regression_loss(
    predictions: Tensor,  # (B,) r(x), with grad
    labels: Tensor,  # (B,) the user's scalar label for x
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean squared error to scalar labels, for data that comes as (text, score) rather than pairs.

    Unlike the pairwise loss this fixes the reward's offset and scale to the labels' (the pairwise loss
    leaves the offset free, so a pairwise reward model's absolute values mean nothing on their own).
    """
    if predictions.shape != labels.shape or predictions.dim() != 1:
        raise ValueError(f"predictions and labels must both be (B,), got {tuple(predictions.shape)} and "
                         f"{tuple(labels.shape)}")
    loss = ((predictions - labels) ** 2).mean()
    with torch.no_grad():
        stats = {"mse": loss.detach(), "prediction_mean": predictions.mean(), "label_mean": labels.mean(),
                 "loss": loss.detach()}
    return loss, stats
