from tether.rollout.generate import Rollout, sample
from tether.rollout.sampling import Sampler

__all__ = ["Rollout", "Sampler", "sample"]
