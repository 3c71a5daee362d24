"""Response masks and masked statistics. One mask rules KL, values, advantages, losses, entropy."""

import torch
from torch import Tensor


def response_mask(responses: Tensor, eos_token_ids: Tensor | list[int] | int) -> Tensor:
    """1 on every response token up to and including the first EOS, 0 after it.

    responses: (B, T) sampled token ids. Tokens after the first EOS are padding from batched
    generation (FAQ: "finished sequences are padded until the end"); they were never sampled
    by the policy, so nothing may be computed on them.
    Returns (B, T) float mask.
    """
    eos = torch.as_tensor(eos_token_ids, device=responses.device).reshape(-1)
    is_eos = torch.isin(responses, eos).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # number of EOS strictly before position t
    return (eos_before == 0).float()


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is 1 (over all positions, or along dim)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over masked positions; Bessel-corrected when unbiased (n / (n - 1))."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"unbiased masked variance needs at least 2 masked values, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over masked positions; positions outside the mask are set to 0.

    shift_mean=False keeps the mean (used for rewards, whose sign carries meaning).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask
