"""The LM head applied a block of positions at a time, so that no (positions x vocabulary) tensor larger than one
block is ever alive (docs/design.md, "Memory: the vocabulary a block at a time").

A model's teacher-forced forward gives final hidden states (B, T, H), which are small; the logits (B, T, V) are
V / H times larger (2,374 times for a width-64 body with Qwen's 151,936 tokens). `over_positions` projects the
hidden states of one block of positions onto the vocabulary, hands those logits to a per-token function that
reduces them to a few numbers per position (log-probs, entropy, KL), and lets them go before the next block.
With gradients each block runs under `torch.utils.checkpoint`: its logits are computed again in the backward
pass, one block at a time, instead of being kept from the forward pass.

Everything here runs inside the trained module's forward (`PolicyWithValueHead.forward`), where FSDP has gathered
the LM head's weight and keeps it for the backward recompute. Under DeepSpeed ZeRO-3, which gathers at every call
of the head from all processes, a micro-batch is one block (`trainers/assemble.py: logits_block_rows`).
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


# Positions x vocabulary elements per block when `logits_chunk_rows` is 0 (automatic): 2**23 float32 logits
# are 32 MB, and the per-token functions keep about four such buffers at once.
BLOCK_ELEMENTS = 1 << 23

# per_token(logits block (b, t, V) fp32, rows slice, columns slice) -> {name: (b, t) tensor}
PerToken = Callable[[Tensor, slice, slice], dict[str, Tensor]]


def block_rows(chunk_rows: int, vocab_size: int) -> int:
    """Positions per block: the `logits_chunk_rows` key, or with 0 as many as fit BLOCK_ELEMENTS."""
    return chunk_rows if chunk_rows > 0 else max(1, BLOCK_ELEMENTS // vocab_size)


def position_blocks(batch: int, length: int, rows: int) -> list[tuple[slice, slice]]:
    """(rows slice, positions slice) pairs that tile a (batch, length) grid, each covering at most `rows` cells
    (at least one): whole rows of the batch and a run of positions when a batch row's worth fits, else single
    positions of at most `rows` batch rows."""
    if batch * length == 0:
        return []
    if batch <= rows:
        step = max(1, rows // batch)
        return [(slice(0, batch), slice(t, min(t + step, length))) for t in range(0, length, step)]
    return [(slice(b, min(b + rows, batch)), slice(t, t + 1)) for b in range(0, batch, rows) for t in range(length)]


def over_positions(per_token: PerToken, states: Tensor, project: Callable[[Tensor], Tensor], rows: int
                   ) -> dict[str, Tensor]:
    """per_token over every block of positions of `states` (B, T, H), each block's logits `project(states block)`
    (fp32); the blocks' results put back together as (B, T) tensors. With gradients and more than one block,
    each block is checkpointed (its logits recomputed in the backward pass); a single block is not, since
    recomputing it would save no memory."""
    B, T = states.shape[:2]
    blocks = position_blocks(B, T, rows)

    def run(part: Tensor, b: slice, t: slice) -> dict[str, Tensor]:
        return per_token(project_block(project, part), b, t)

    if not (torch.is_grad_enabled() and states.requires_grad):
        # Without gradients each block's results go straight into (B, T) buffers and are dropped: small tensors
        # kept across blocks would be carved out of the blocks' freed logits, and the next block's logits would
        # then need fresh memory (the process's peak grew with the number of blocks that way).
        result: dict[str, Tensor] = {}
        for b, t in blocks:
            for name, value in run(states[b, t], b, t).items():
                if name not in result:
                    result[name] = value.new_empty((B, T))
                result[name][b, t] = value
        return result
    outs = [checkpoint(run, states[b, t], b, t, use_reentrant=False) if len(blocks) > 1 else run(states[b, t], b, t)
            for b, t in blocks]
    if not outs:
        return {}
    result = {}
    for name in outs[0]:
        rows_of = {}  # batch slice start -> that slice's blocks, in position order
        for (b, _), out in zip(blocks, outs):
            rows_of.setdefault(b.start, []).append(out[name])
        result[name] = torch.cat([torch.cat(parts, 1) for parts in rows_of.values()], 0)
    return result


# Config keys of transformers models that change the logits after the LM head. The probe below also catches
# them, but with small random weights a soft cap is close to the identity.
_AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def project_block(project: Callable[[Tensor], Tensor], part: Tensor) -> Tensor:
    """project(part) for a (b, t, H) block of states -> (b, t, V) fp32 logits. The block is made one (b * t, H)
    matrix first: the head on a strided (b, t, H) slice runs as a batched matmul against its weight expanded b
    times (several times slower on a CPU), whose backward then holds b copies of the (V, H) weight gradient."""
    rows, cols = part.shape[:2]
    return project(part.reshape(rows * cols, -1)).float().view(rows, cols, -1)


@torch.no_grad()
def separable_head(model: nn.Module) -> nn.Module | None:
    """The model's output embedding when its logits are exactly that module applied to the last hidden state of
    its body (`base_model`, checked on a short probe), else None: a model that scales or soft-caps its logits
    after the head (Gemma 2's final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling) is then
    scored from its own logits."""
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    body = getattr(model, "base_model", model)
    if head is None or body is model or any(getattr(config, key, None) not in (None, 1, 1.0) for key in _AFTER_HEAD):
        return None
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4]], device=device) % model.get_input_embeddings().num_embeddings
    try:
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state
    except (TypeError, AttributeError):  # a body that is not a plain transformer stack
        return None
    logits = model(input_ids=ids, use_cache=False).logits
    return head if torch.allclose(head(hidden).float(), logits.float(), rtol=1e-5, atol=1e-5) else None
