from tether.losses.ppo import kl_penalty, policy_loss, value_loss

__all__ = ["kl_penalty", "policy_loss", "value_loss"]
