"""tether: RLHF for transformer language models, PPO on a KL tether to a frozen reference."""

from tether.config import PPOConfig

__version__ = "0.1.0"


_LAZY = {"PPOTrainer": "tether.trainers", "GRPOTrainer": "tether.trainers",
         "RLOOTrainer": "tether.trainers", "ReinforcePPTrainer": "tether.trainers",
         "RewardTrainer": "tether.trainers.reward", "RewardConfig": "tether.reward_config"}


def __getattr__(name):  # keep `import tether` light: the trainers pull in transformers
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["GRPOTrainer", "PPOConfig", "PPOTrainer", "RLOOTrainer", "ReinforcePPTrainer", "RewardConfig",
           "RewardTrainer", "__version__"]
