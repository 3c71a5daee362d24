"""`tether` command line. The flat PPOConfig keys are the flags and the YAML keys."""

import logging
import sys

from jsonargparse import ActionConfigFile, ArgumentParser

from tether.config import PPOConfig


def _ppo_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Train a causal LM with PPO against a reward.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the keys below")
    parser.add_class_arguments(PPOConfig, as_group=False)
    return parser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="tether", description="RLHF for transformer language models.")
    commands = parser.add_subcommands(dest="command")
    commands.add_subcommand("ppo", _ppo_parser(), help="PPO on your model, prompts and reward")
    return parser


def config_from_args(args) -> PPOConfig:
    keys = {k: v for k, v in vars(args).items() if k in PPOConfig.__dataclass_fields__}
    return PPOConfig(**keys)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = args[args.command]
    try:
        if args.command == "ppo":
            from tether.trainers.ppo import PPOTrainer

            config = config_from_args(sub)
            history = PPOTrainer(config).train()
            _summary(config.output_dir, history)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"tether {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _summary(output_dir: str, history: list[dict]) -> None:
    first, last = history[0], history[-1]
    print(f"done: {len(history)} steps; reward {first['env/reward_mean']:.3f} -> {last['env/reward_mean']:.3f}, "
          f"objective/kl {last['objective/kl']:.3f}. Run folder: {output_dir}")


if __name__ == "__main__":
    sys.exit(main())
