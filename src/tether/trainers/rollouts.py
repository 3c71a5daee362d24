"""What a trainer step carries from sampling to the update."""

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Generation:
    queries: list[Tensor]  # each (P_i,) prompt ids, unpadded
    responses: list[Tensor]  # each (T_i,) sampled ids up to and including the first EOS
    texts: list[str]  # decoded responses


@dataclass
class Scored:
    """A rollout batch after step 3; every (B, T) tensor is 0 outside `mask`."""

    query_ids: Tensor  # (B, P) left-padded
    query_mask: Tensor  # (B, P)
    response_ids: Tensor  # (B, T)
    mask: Tensor  # (B, T) response mask: up to and including the first EOS
    logprobs: Tensor  # (B, T) log pi_old(a_t | s_t), sampling-processed
    ref_logprobs: Tensor  # (B, T) log ref(a_t | s_t) at the sampling temperature
    values: Tensor | None  # (B, T) V_old(s_t); None for critic-free algorithms
    kl: Tensor  # (B, T) per-token KL estimate (the configured estimator; with kl_in_loss on the untruncated
    #             log pi_T the loss's KL term uses, else on `logprobs`: it enters the reward)
    kl_exact: Tensor  # (B, T) exact KL(pi(.|s_t) || ref(.|s_t)) over the vocabulary, >= 0
    entropy: Tensor  # (B, T) entropy of the processed sampling distribution
    flipped: Tensor  # (B, T) bool: sampled at a top-k/top-p boundary, outside the replayed support by round-off
