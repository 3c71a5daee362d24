"""How the per-token loss terms of one minibatch become one number (config `loss_aggregation`): each rule gives
per-token weights, normalised over the minibatch's rows on every process (`all_reduce` sums over processes), so
that the loss is sum(weights * per-token loss) whichever micro-batches and processes hold the rows.

mask: (B, T) the loss mask of this process's rows of the minibatch (0 on padding and on rows left out of the
loss); constant: the fixed length normaliser of sequence_sum_norm. A minibatch with no loss token has no loss:
every weight is 0 (the update skips it).
"""

from collections.abc import Callable

from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]


def _rows(mask: Tensor, all_reduce: AllReduce) -> Tensor:
    """Rows with at least one loss token, over every process."""
    return all_reduce((mask.sum(-1) > 0).sum().to(mask.dtype)).clamp(min=1)


def token_mean(mask: Tensor, all_reduce: AllReduce, constant: float) -> Tensor:
    """Every loss token of the minibatch weighs the same: sum / (loss tokens). DAPO's token-level loss (Yu et
    al. 2025), veRL's loss_agg_mode="token-mean", TRL's loss_type="dapo" / "bnpo"; tether's default."""
    return mask / all_reduce(mask.sum()).clamp(min=1)


def sequence_mean(mask: Tensor, all_reduce: AllReduce, constant: float) -> Tensor:
    """Mean over each sequence's tokens, then over sequences: a long completion weighs as much as a short one
    (the GRPO paper, Shao et al. 2024, eq. 3; veRL's "seq-mean-token-mean", TRL's loss_type="grpo")."""
    return mask / mask.sum(-1, keepdim=True).clamp(min=1) / _rows(mask, all_reduce)


def sequence_sum_norm(mask: Tensor, all_reduce: AllReduce, constant: float) -> Tensor:
    """Each sequence's token sum divided by one constant (max_new_tokens unless set), then the mean over sequences:
    no length-dependent weighting at all (Dr. GRPO, Liu et al. 2025; veRL's "seq-mean-token-sum-norm", TRL's
    loss_type="dr_grpo", which counts every row; rows left out of the loss are not counted here)."""
    return mask / (constant * _rows(mask, all_reduce))


AGGREGATIONS: dict[str, Callable[[Tensor, AllReduce, float], Tensor]] = {
    "token_mean": token_mean, "sequence_mean": sequence_mean, "sequence_sum_norm": sequence_sum_norm}
