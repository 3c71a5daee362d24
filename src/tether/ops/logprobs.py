"""Log-probabilities of chosen tokens and entropies, without needless (B, T, V) copies.

The (..., V) tensors here are the largest a PPO step touches after the weights (V = 49152 for SmolLM2), and on
CPU every elementwise pass over them is memory-bound, so the functions below count passes: where autograd is
not involved they work in place on buffers they own, and `token_stats` gets everything the scoring pass needs
from one log-softmax per model. Measured costs: docs/benchmarks.md ("Where the time goes").
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Rows of (..., V) processed together by token_stats: 2**24 elements is 64 MB per float32 buffer.
_CHUNK_ELEMENTS = 1 << 24


def gather_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] for each position.

    logits: (..., V) float, may hold -inf for tokens a sampler filtered out.
    tokens: (...) long.
    Returns (...): log p(token). Computed as logit[token] - logsumexp(logits), so the
    full (..., V) log-softmax is never materialised. With autograd, the backward pass is one fused
    function (softmax from the saved logsumexp, scaled, plus the one-hot) instead of autograd's separate
    gather and logsumexp gradients and their sum: 3 passes over (..., V) instead of 6.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return _GatherLogprobs.apply(logits, tokens)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class _GatherLogprobs(torch.autograd.Function):
    """d/dx_v [x_a - logsumexp(x)] = 1[v = a] - softmax(x)_v, so grad_x = g * (onehot(a) - softmax(x))."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor) -> Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, tokens, lse)
        return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, tokens, lse = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        out = torch.sub(logits, lse.unsqueeze(-1)).exp_()  # softmax; exp(-inf) = 0 for filtered tokens
        out.mul_(-g)
        return out.scatter_add_(-1, tokens.unsqueeze(-1), g), None


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: (..., V) -> (...).

    Filtered tokens (logit -inf, p = 0) contribute 0, not 0 * -inf = nan, so this is the
    entropy of the distribution that actually sampled (after top-k / top-p).
    """
    if not (torch.is_grad_enabled() and logits.requires_grad):
        logp = torch.log_softmax(logits.float(), dim=-1)
        return _neg_plogp(logp)
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    # Zero logp *before* multiplying: where(p > 0, p * logp, 0) is right going forward, but its backward
    # still evaluates 0 * -inf = nan for the branch it discards.
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def _neg_plogp(logp: Tensor) -> Tensor:
    """-sum p log p from log-probs, overwriting `logp` (a buffer the caller owns and no longer needs).
    -inf (p = 0) becomes the most negative float first, so p * log p is 0 * finite = 0, not nan."""
    p = logp.exp()
    logp.clamp_(min=torch.finfo(logp.dtype).min)
    return logp.mul_(p).sum(-1).neg_()


class TokenStats(NamedTuple):
    """Everything the no-grad scoring pass needs from the processed policy and reference scores."""

    logprobs: Tensor  # (...) log pi(a) under the processed scores; -inf where the sampler filtered a
    ref_logprobs: Tensor  # (...) log ref(a)
    entropy: Tensor  # (...) entropy of pi
    kl: Tensor  # (...) exact KL(pi || ref) over the vocabulary, >= 0 (= ops.kl.kl_full)


@torch.no_grad()
def token_stats(scores: Tensor, ref_scores: Tensor, tokens: Tensor, chunk_rows: int | None = None) -> TokenStats:
    """gather_logprobs(scores), gather_logprobs(ref_scores), entropy_from_logits(scores) and
    kl_full(scores, ref_scores) at once, without gradients.

    scores: (..., V) the policy's processed scores (-inf where filtered); ref_scores: (..., V) finite;
    tokens: (...) long. One log-softmax per side, one exp, and in-place products: 3 (..., V) float32 buffers
    instead of the separate functions' 3 logsumexps, 3 log-softmaxes and a dozen temporaries. Rows (positions)
    are processed at most chunk_rows at a time (default: 64 MB per buffer; blocks of the leading dimensions,
    so strided inputs are never copied), which bounds the memory without changing any row's result.
    """
    *lead, V = scores.shape
    rows = chunk_rows or max(1, _CHUNK_ELEMENTS // V)
    out = [scores.new_empty(lead, dtype=torch.float32) for _ in TokenStats._fields]
    for idx in _blocks(tuple(lead), rows):
        for buffer, part in zip(out, _token_stats_rows(scores[idx], ref_scores[idx], tokens[idx].unsqueeze(-1))):
            buffer[idx] = part
    return TokenStats(*out)


def _blocks(shape: tuple[int, ...], rows: int):
    """Index tuples that cover `shape`, each selecting at most `rows` elements (or a single one)."""
    if not shape:
        yield ()
        return
    inner = math.prod(shape[1:])
    if inner <= rows:
        step = max(1, rows // inner)
        yield from ((slice(i, i + step),) for i in range(0, shape[0], step))
    else:
        yield from ((i, *rest) for i in range(shape[0]) for rest in _blocks(shape[1:], rows))


def _token_stats_rows(x: Tensor, y: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    logp = torch.log_softmax(x.float(), dim=-1)
    logq = torch.log_softmax(y.float(), dim=-1)
    logprobs, ref_logprobs = logp.gather(-1, a).squeeze(-1), logq.gather(-1, a).squeeze(-1)
    p = logp.exp()
    tiny = torch.finfo(logp.dtype).min
    logp.clamp_(min=tiny)  # p = 0 terms: 0 * finite = 0 below, never 0 * -inf = nan
    log_ratio = torch.sub(logp, logq.clamp_(min=tiny), out=logq)
    kl = log_ratio.mul_(p).sum(-1).clamp_(min=0.0)  # clamp only float round-off, as kl_full does
    entropy = logp.mul_(p).sum(-1).neg_()
    return logprobs, ref_logprobs, entropy, kl
