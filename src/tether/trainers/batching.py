"""Padding helpers. Masks come from lengths, never from comparing ids with pad (pad may equal EOS)."""

import torch
from torch import Tensor


def left_pad(seqs: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts: real tokens flush right so every prompt ends where the response starts."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
    return ids, mask


def right_pad(seqs: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask


def length_order(query_mask: Tensor, response_mask: Tensor) -> Tensor:
    """Row order by prompt + response length (stable): consecutive rows then need little padding between them.
    Every loss and statistic is a sum over rows, so grouping rows this way changes only the work."""
    return torch.sort(query_mask.sum(-1) + response_mask.sum(-1), stable=True).indices
