"""The sampling distribution, written once and used twice: to sample, and to score what was sampled.

The FAQ's negative KL comes from scoring a token under a different distribution than the one that
sampled it (top-k, min_length, padding). `Sampler.step_scores` is what generation samples from;
`Sampler.sequence_scores` replays exactly the same processing on teacher-forced logits, so the
log-prob used in every PPO ratio and KL is the log-prob of the distribution that drew the token.
The reference is scored at the same temperature but without truncation (`reference_scores`):
KL(pi_processed || ref_T) is then a true, finite KL, because ref_T gives every token mass.
"""

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers.generation import logits_process as lp

# Processors that act on each row of scores alone (no context): replayed in one batched call.
ROWWISE = (lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper, lp.MinPLogitsWarper,
           lp.TypicalLogitsWarper, lp.EpsilonLogitsWarper, lp.EtaLogitsWarper)
# Deterministic functions of (prefix ids, scores): replayed step by step on the same prefix.
CONTEXTUAL = (lp.NoRepeatNGramLogitsProcessor, lp.NoBadWordsLogitsProcessor, lp.SequenceBiasLogitsProcessor,
              lp.SuppressTokensLogitsProcessor)

# `generate` settings tether refuses, and why: each breaks "one token, one known sampling probability".
_REFUSED = {
    "num_beams": "beam search keeps whole beams by their joint score; no per-token sampling probability exists",
    "num_beam_groups": "group beam search is beam search",
    "diversity_penalty": "diversity penalties only apply to group beam search",
    "penalty_alpha": "contrastive search picks tokens deterministically by a degeneration penalty",
    "do_sample": "greedy decoding is deterministic; PPO needs the probability the sampler gave each token",
    "guidance_scale": "classifier-free guidance mixes in an unconditional forward pass that tether does not replay",
    "assistant_model": "assisted (speculative) decoding is not replayed by tether",
    "prompt_lookup_num_tokens": "prompt-lookup decoding is not replayed by tether",
    "logits_processor": "pass processor objects to PPOTrainer(logits_processors=[...]), where tether checks they "
                        "can be replayed",
    "min_length": "min_length counts prompt tokens too; use min_new_tokens",
}
_FLAT_KEYS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
              "no_repeat_ngram_size")
_HARMLESS = {"do_sample": True, "num_beams": 1, "use_cache": True}


def generation_kwargs_errors(kwargs: dict) -> list[str]:
    """Reasons each extra generate() setting cannot be used; empty when all are fine."""
    errors = []
    for key, value in kwargs.items():
        if key in _HARMLESS and value == _HARMLESS[key]:
            continue
        if key in _FLAT_KEYS:
            errors.append(f"generation_kwargs.{key}: set the config key `{key}` instead")
        elif key in _REFUSED:
            errors.append(f"generation_kwargs.{key}={value!r} is refused: {_REFUSED[key]}")
        else:
            errors.append(f"generation_kwargs.{key} is not a setting tether can replay when scoring samples; "
                          f"supported sampling keys are {', '.join(_FLAT_KEYS)}")
    return errors


class Sampler:
    """Turns raw next-token logits into the scores that are sampled from.

    Order: EOS suppression for min_new_tokens, repetition penalty, contextual processors (n-gram blocking
    first), then temperature, top-k, top-p and other row-wise warpers. transformers' generate bans EOS after
    its penalties, which gives the same scores (-inf stays -inf under each), but runs custom processors
    before its temperature and truncation; here a custom row-wise warper sees tempered, truncated scores.
    """

    def __init__(
        self,
        eos_token_ids: Sequence[int],
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_new_tokens: int = 0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        logits_processors: Sequence[lp.LogitsProcessor] = (),
    ) -> None:
        unknown = [type(p).__name__ for p in logits_processors if not isinstance(p, ROWWISE + CONTEXTUAL)]
        if unknown:
            raise ValueError(
                f"logits processor(s) {unknown} cannot be replayed: tether only accepts processors known to be "
                f"pure functions of (prefix ids, scores), so that the log-prob it scores equals the one that "
                f"sampled. Known: {sorted(c.__name__ for c in ROWWISE + CONTEXTUAL)}")
        keyed = {lp.TemperatureLogitsWarper: "temperature", lp.TopKLogitsWarper: "top_k", lp.TopPLogitsWarper: "top_p",
                 lp.MinNewTokensLengthLogitsProcessor: "min_new_tokens",
                 lp.RepetitionPenaltyLogitsProcessor: "repetition_penalty",
                 lp.NoRepeatNGramLogitsProcessor: "no_repeat_ngram_size"}
        for p in logits_processors:
            if type(p) in keyed:  # the reference must see the same temperature; one place sets each setting
                raise ValueError(f"pass {type(p).__name__} as the config key `{keyed[type(p)]}`, not as a logits processor")
        self.eos_token_ids = torch.tensor(list(eos_token_ids), dtype=torch.long)
        self.temperature, self.min_new_tokens = float(temperature), int(min_new_tokens)
        self.repetition_penalty = float(repetition_penalty)
        self.contextual = [p for p in logits_processors if isinstance(p, CONTEXTUAL)]
        if no_repeat_ngram_size > 0:
            self.contextual.insert(0, lp.NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
        rowwise = [lp.TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        if top_k > 0:
            rowwise.append(lp.TopKLogitsWarper(top_k))
        if top_p < 1.0:
            rowwise.append(lp.TopPLogitsWarper(top_p))
        self.rowwise = rowwise + [p for p in logits_processors if isinstance(p, ROWWISE)]
        # Only a division by the temperature (or nothing) is row-wise: replayed without the generic warper loop.
        self._temperature_only = all(type(p) is lp.TemperatureLogitsWarper for p in self.rowwise)

    @property
    def only_temperature(self) -> bool:
        """The sampling scores are `reference_scores(logits)`: no processing beyond the temperature."""
        return self._temperature_only and not self.needs_context

    @property
    def needs_context(self) -> bool:
        return self.min_new_tokens > 0 or self.repetition_penalty != 1.0 or bool(self.contextual)

    def step_scores(self, logits: Tensor, ids: Tensor, mask: Tensor, t: int) -> Tensor:
        """Scores for sampling response token t. logits: (B, V) raw; ids, mask: (B, P + t) prefix and
        its attention mask (left padding is 0 in mask). Returns (B, V) float, -inf where filtered."""
        return self._rowwise(self._contextual(logits.float(), ids, mask, t))

    def sequence_scores(self, logits: Tensor, ids: Tensor, mask: Tensor, start: int = 0) -> Tensor:
        """Teacher-forced replay. logits: (B, T, V) raw, position i predicting response token start + i;
        ids, mask: (B, P + start + T) prompt + response up to the last of those tokens. Returns (B, T, V), equal
        to step_scores at each position."""
        B, T, V = logits.shape
        P = ids.shape[1] - T  # the prefix before the first of these positions
        x = logits.float()
        if self.needs_context:
            x = torch.stack([self._contextual(x[:, i], ids[:, : P + i], mask[:, : P + i], start + i)
                             for i in range(T)], 1)
        if self._temperature_only:
            # No reshape: logits arrive as a strided slice, and reshape(B * T, V) would copy all of them (and
            # copy the gradient back) only to divide, or to do nothing at temperature 1.
            return x if self.temperature == 1.0 else x / self.temperature
        return self._rowwise(x.reshape(B * T, V)).reshape(B, T, V)

    def reference_scores(self, logits: Tensor) -> Tensor:
        """The reference at the sampling temperature, untruncated (see the module docstring). The policy's
        logits through this give the distribution the KL term of the loss compares with the reference."""
        x = logits.float()
        return x if self.temperature == 1.0 else x / self.temperature  # no (..., V) copy to divide by 1

    def _contextual(self, x: Tensor, ids: Tensor, mask: Tensor, t: int) -> Tensor:
        if t < self.min_new_tokens:
            eos = self.eos_token_ids.to(x.device)
            x = x.index_fill(-1, eos, float("-inf"))
        if self.repetition_penalty != 1.0:
            x = _repetition_penalty(x, ids, mask, self.repetition_penalty)
        for processor in self.contextual:
            x = processor(ids, x)
        return x

    def _rowwise(self, x: Tensor) -> Tensor:
        dummy_ids = x.new_zeros((x.shape[0], 1), dtype=torch.long)  # row-wise warpers ignore ids
        for processor in self.rowwise:
            x = processor(dummy_ids, x)
        return x


def _repetition_penalty(x: Tensor, ids: Tensor, mask: Tensor, penalty: float) -> Tensor:
    """CTRL penalty (Keskar et al. 2019) on tokens seen in the prefix. Unlike transformers' processor,
    left padding is not 'seen': a prompt's sampling distribution must not depend on how much padding
    its batch happened to need."""
    # scatter_add (not scatter_): with duplicate ids, a token seen at any unmasked position must count.
    seen = torch.zeros_like(x).scatter_add_(1, ids, mask.to(x.dtype)) > 0
    penalised = torch.where(x < 0, x * penalty, x / penalty)
    return torch.where(seen, penalised, x)
