from tether.models.policy import PolicyWithValueHead, frozen_reference, load_causal_lm, response_forward

__all__ = ["PolicyWithValueHead", "frozen_reference", "load_causal_lm", "response_forward"]
