"""tether: RLHF for transformer language models, PPO on a KL tether to a frozen reference."""

from tether.config import PPOConfig

__version__ = "0.1.0"


def __getattr__(name):  # keep `import tether` light: the trainer pulls in transformers
    if name == "PPOTrainer":
        from tether.trainers.ppo import PPOTrainer

        return PPOTrainer
    raise AttributeError(name)


__all__ = ["PPOConfig", "PPOTrainer", "__version__"]
