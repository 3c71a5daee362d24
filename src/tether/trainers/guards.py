"""Run-time guards: numerical faults that skip updates, and the check that the KL estimate is not negative."""

import warnings

from torch import Tensor

from tether.trainers.setup import t_critical_001


class TrainingHalted(RuntimeError):
    """Too many numerical faults in a row; the message says which and where."""


class FaultCounter:
    """Counts steps whose update was skipped for a nan/inf reward, loss or gradient; halts the run after
    `max_in_row` such steps in a row (a good step resets the streak)."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row, self.in_row, self.skipped_steps = max_in_row, 0, 0

    def record(self, faulty: bool, why: str, step: int) -> None:
        self.in_row = self.in_row + 1 if faulty else 0
        self.skipped_steps += int(faulty)
        if self.in_row >= self.max_in_row:
            raise TrainingHalted(f"stopped at step {step}: {self.in_row} steps in a row had updates skipped for "
                                 f"numerical faults (max_faults_in_row={self.max_in_row}); the last: {why}. "
                                 f"The weights are those of the last good update.")

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.in_row, self.skipped_steps = state["in_row"], state["skipped_steps"]


def warn_if_negative_kl(estimate_per_seq: Tensor, step: int) -> None:
    """The sampled estimate's expectation is the true KL (>= 0). A batch mean significantly below zero
    (one-sided t-test, p < 0.001) means the samples were not drawn from the distribution they were scored
    under. The t critical value matters: with a handful of completions the standard error is itself noisy."""
    n = len(estimate_per_seq)
    if n < 2:
        return
    mean = estimate_per_seq.mean().item()
    stderr = (estimate_per_seq.std() / n**0.5).item()
    if not mean < -max(t_critical_001(n - 1) * stderr, 1e-6):
        return
    warnings.warn(
        f"objective/kl_estimate = {mean:.4g} < 0 at step {step}, {abs(mean) / max(stderr, 1e-12):.1f} "
        f"standard errors below zero; a true KL cannot be negative, and a negative one is a reward the policy "
        f"can farm. tether scores every sample under the distribution that drew it, so the likely causes are "
        f"responses not produced by this trainer's generate() (sampled with other settings such as top-k, "
        f"top-p or min_new_tokens, by another generation loop, or re-tokenised from text) or prompts padded "
        f"differently than at generation.", stacklevel=4)
