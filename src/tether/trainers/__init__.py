from tether.trainers.base import Generation, RLTrainer, trainer_class
from tether.trainers.grpo import GRPOTrainer
from tether.trainers.ppo import PPOTrainer
from tether.trainers.reinforce_pp import ReinforcePPTrainer
from tether.trainers.rloo import RLOOTrainer

__all__ = ["GRPOTrainer", "Generation", "PPOTrainer", "RLOOTrainer", "RLTrainer", "ReinforcePPTrainer",
           "trainer_class"]
