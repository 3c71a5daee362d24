"""What a trainer step carries from sampling to the update: the sampled token ids, then one `Rollouts` batch
that the step's functions fill in order (scoring, then scores and advantages) and read from."""

from dataclasses import dataclass, fields, replace

from torch import Tensor

from tether.ops.masks import padding_bounds


@dataclass
class Generation:
    queries: list[Tensor]  # each (P_i,) prompt ids, unpadded
    responses: list[Tensor]  # each (T_i,) sampled ids up to and including the first EOS
    texts: list[str]  # decoded responses
    logprobs: list[Tensor] | None = None  # each (T_i,) log mu(a_t | s_t): the rollout engine's, processed


@dataclass
class Sampled:
    """What a rollout engine returns for a list of queries."""

    responses: list[Tensor]  # each (T_i,) sampled ids up to and including the first EOS
    logprobs: list[Tensor]  # each (T_i,) log mu(a_t | s_t): the engine's, under the processed distribution


@dataclass
class Rollouts:
    """One step's rollouts. B rows, P prompt and T response positions; every (B, T) tensor is 0 outside `mask`.
    pi_old is the policy that sampled, under the sampler's processing, as the trainer computes it; ref the frozen
    reference at the sampling temperature; mu the rollout engine's own numbers for pi_old (vLLM's kernels: close to
    pi_old, not equal; rollout/engines.py)."""

    # what was sampled
    query_ids: Tensor  # (B, P) left-padded prompt ids
    query_mask: Tensor  # (B, P)
    response_ids: Tensor  # (B, T) a_t, right-padded
    mask: Tensor  # (B, T) response mask: up to and including the first EOS
    # scored once after sampling (trainers/scoring.py)
    logprobs: Tensor  # (B, T) log pi_old(a_t | s_t), sampling-processed, the trainer's replay: the PPO ratio's base
    ref_logprobs: Tensor  # (B, T) log ref_T(a_t | s_t)
    flipped: Tensor  # (B, T) bool: sampled at a top-k/top-p boundary, outside the replayed support by round-off
    values: Tensor | None  # (B, T) V_old(s_t); None for critic-free algorithms
    kl: Tensor  # (B, T) the configured estimator (with kl_in_loss on log pi_T, untruncated, as the loss term)
    kl_exact: Tensor  # (B, T) KL(pi_old(.|s_t) || ref_T(.|s_t)) over the vocabulary, >= 0
    entropy: Tensor  # (B, T) H(pi_old(.|s_t)) of the processed sampling distribution
    # from the reward (the step, then the algorithm)
    scores: Tensor | None = None  # (B,) processed scores r
    advantages: Tensor | None = None  # (B, T) A_t (whitened when whiten_advantages)
    returns: Tensor | None = None  # (B, T) value targets; None without a critic
    non_score: Tensor | None = None  # (B, T) the KL part of the per-token reward, -beta * KL_t (0 in the loss)
    loss_mask: Tensor | None = None  # (B, T) the tokens the loss trains on, when not all of `mask`: rows left out
    # (overlong: mask, the zero-variance fill of dynamic sampling) are 0
    # from the rollout engine (trainers/behaviour.py)
    engine_logprobs: Tensor | None = None  # (B, T) log mu(a_t | s_t), the engine's log-probs of what it sampled
    correction: Tensor | None = None  # (B, T) rollout correction weight ~ pi_old / mu, capped, no grad; None: off

    @property
    def train_mask(self) -> Tensor:
        """The tokens the update's loss sees: `loss_mask`, or every response token."""
        return self.mask if self.loss_mask is None else self.loss_mask

    def trimmed(self) -> "Rollouts":
        """The same rows without the prompt columns that are padding in every row (left) and the response columns
        past every row's last token (right): a micro-batch's model inputs at its own longest prompt and response.
        Teacher-forced log-probs do not depend on padding (position ids skip it, attention masks it), so only the
        work shrinks."""
        p0, t1 = padding_bounds(self.query_mask, self.mask)
        T = self.mask.shape[1]
        cut = {f.name: getattr(self, f.name)[:, p0:] for f in fields(self) if f.name in ("query_ids", "query_mask")}
        cut.update({f.name: getattr(self, f.name)[:, :t1] for f in fields(self) if f.name not in cut
                    and getattr(self, f.name) is not None and getattr(self, f.name).dim() == 2
                    and getattr(self, f.name).shape[1] == T})
        return replace(self, **cut)

    def rows(self, index: Tensor) -> "Rollouts":
        """The same batch restricted to rows `index` (every tensor field along its first dimension)."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if getattr(self, f.name) is not None})
