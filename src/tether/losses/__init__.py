from tether.losses.ppo import policy_loss, value_loss

__all__ = ["policy_loss", "value_loss"]
