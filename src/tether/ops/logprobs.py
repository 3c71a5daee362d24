"""Log-probabilities of chosen tokens and entropies, without needless (B, T, V) copies."""

import torch
from torch import Tensor


def gather_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] for each position.

    logits: (..., V) float, may hold -inf for tokens a sampler filtered out.
    tokens: (...) long.
    Returns (...): log p(token). Computed as logit[token] - logsumexp(logits), so the
    full (..., V) log-softmax is never materialised.
    """
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: (..., V) -> (...).

    Filtered tokens (logit -inf, p = 0) contribute 0, not 0 * -inf = nan, so this is the
    entropy of the distribution that actually sampled (after top-k / top-p).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    # Zero logp *before* multiplying: where(p > 0, p * logp, 0) is right going forward, but its backward
    # still evaluates 0 * -inf = nan for the branch it discards.
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
