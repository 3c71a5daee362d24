"""The RL trainer (base.py) and its named forms: PPOTrainer, GRPOTrainer, RLOOTrainer, ReinforcePPTrainer each
refuse a config of another algorithm; `trainer_class` gives the class for any entry of tether.algorithms."""

from tether.rollout.batch import Generation
from tether.trainers.base import RLTrainer


class PPOTrainer(RLTrainer):
    algorithm = "ppo"


class GRPOTrainer(RLTrainer):
    algorithm = "grpo"


class RLOOTrainer(RLTrainer):
    algorithm = "rloo"


class ReinforcePPTrainer(RLTrainer):
    algorithm = "reinforce++"


_NAMED = {cls.algorithm: cls for cls in (PPOTrainer, GRPOTrainer, RLOOTrainer, ReinforcePPTrainer)}


def trainer_class(algorithm: str) -> type[RLTrainer]:
    """The trainer class for a PPOConfig.algorithm: its named class, or RLTrainer for a registered method."""
    from tether.algorithms import ALGORITHMS

    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is not one of {sorted(ALGORITHMS)}")
    return _NAMED.get(algorithm, RLTrainer)


__all__ = ["GRPOTrainer", "Generation", "PPOTrainer", "RLOOTrainer", "RLTrainer", "ReinforcePPTrainer",
           "trainer_class"]
