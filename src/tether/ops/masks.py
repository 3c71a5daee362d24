"""Response masks and masked statistics. One mask rules KL, values, advantages, losses, entropy.

The statistics take an optional `all_reduce`: a callable that sums a tensor across processes (see
`tether.collectives.sum_all_reduce`). It is applied to the masked sums and the mask counts only, so with N
processes each holding a slice of the batch the result is the statistic over every process's tokens, as one
process holding the whole batch would compute it (the Bessel correction uses the global count). It is a
collective: every process must make the same calls in the same order. It carries no gradient; use it for
statistics of detached tensors (whitening advantages and rewards, metrics), not inside a loss.
"""

from collections.abc import Callable

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]


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


def _sum_and_count(x: Tensor, mask: Tensor, all_reduce: AllReduce | None) -> tuple[Tensor, Tensor]:
    """(sum of x * mask, sum of mask), summed across processes by one all_reduce call when given."""
    total, count = (x * mask).sum(), mask.sum()
    if all_reduce is None:
        return total, count
    # One collective for both. At least float32 in transit: a bf16 count is exact only up to 256.
    wire = torch.promote_types(torch.promote_types(total.dtype, count.dtype), torch.float32)
    reduced = all_reduce(torch.stack([total.to(wire), count.to(wire)]))
    return reduced[0].to(total.dtype), reduced[1].to(count.dtype)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, *, all_reduce: AllReduce | None = None) -> Tensor:
    """Mean of x over positions where mask is 1 (over all positions, or along dim).

    all_reduce: sum across processes for the global mean over all positions; not allowed with dim (rows and
    padded widths differ between processes, so per-dimension sums do not line up).
    """
    if dim is not None:
        if all_reduce is not None:
            raise ValueError("masked_mean: all_reduce needs dim=None (a global mean over all masked positions)")
        return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)
    total, count = _sum_and_count(x, mask, all_reduce)
    return total / count.clamp(min=1)


def _masked_var(x: Tensor, mask: Tensor, mean: Tensor, unbiased: bool, all_reduce: AllReduce | None) -> Tensor:
    squares, n = _sum_and_count((x - mean) ** 2, mask, all_reduce)
    var = squares / n.clamp(min=1)
    if unbiased:
        if n < 2:
            raise ValueError(f"unbiased masked variance needs at least 2 masked values, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, *, all_reduce: AllReduce | None = None) -> Tensor:
    """Variance of x over masked positions; Bessel-corrected when unbiased (n / (n - 1), n the global count).

    Two passes (mean, then squared deviations from it), not E[x^2] - E[x]^2, which cancels badly.
    """
    return _masked_var(x, mask, masked_mean(x, mask, all_reduce=all_reduce), unbiased, all_reduce)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, *,
                  all_reduce: AllReduce | None = None) -> Tensor:
    """(x - mean) / std over masked positions; positions outside the mask are set to 0.

    shift_mean=False keeps the mean (used for rewards, whose sign carries meaning).
    """
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    var = _masked_var(x, mask, mean, True, all_reduce)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask


def padding_bounds(query_mask: Tensor, response_mask: Tensor) -> tuple[int, int]:
    """(p0, t1): rows' prompts (left-padded) and responses (right-padded) need only columns p0: and :t1, the
    first column with a real prompt token in any row and one past the last response token of any row (at
    least 1)."""
    p0 = int((query_mask.sum(0) > 0).int().argmax())
    filled = response_mask.sum(0).nonzero()
    return p0, int(filled.max()) + 1 if len(filled) else 1
