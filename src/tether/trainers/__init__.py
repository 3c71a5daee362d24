from tether.trainers.ppo import Generation, PPOTrainer

__all__ = ["Generation", "PPOTrainer"]
