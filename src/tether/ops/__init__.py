"""Pure tensor math. Imports only torch. Shapes: B batch, T response tokens, V vocabulary."""

from tether.ops.advantages import gae, group_centred, group_normalised, leave_one_out
from tether.ops.kl import ESTIMATORS, KLEstimator, get_estimator, kl_full
from tether.ops.logprobs import entropy_from_logits, gather_logprobs
from tether.ops.masks import masked_mean, masked_var, masked_whiten, response_mask
from tether.ops.rewards import RunningMoments, shape_rewards

__all__ = [
    "ESTIMATORS", "KLEstimator", "RunningMoments", "entropy_from_logits", "gae", "gather_logprobs",
    "get_estimator", "group_centred", "group_normalised", "kl_full", "leave_one_out", "masked_mean", "masked_var", "masked_whiten", "response_mask",
    "shape_rewards",
]
