"""`tether` command line. The flat PPOConfig keys are the flags and the YAML keys."""

import logging
import sys
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from tether.algorithms import ALGORITHMS
from tether.config import PPOConfig
from tether.demo import DEMO_DEFAULTS
from tether.report.trackers import TrackerError
from tether.rewards import RewardError
from tether.trainers.checkpoint import CheckpointWriteError
from tether.trainers.guards import TrainingHalted
from tether.trainers.lock import hold_output_dir, launched_as_main

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # PPOConfig's field docstrings become --help


def algorithm_commands() -> dict[str, str]:
    """`tether <command>` -> PPOConfig.algorithm, for every entry of the algorithm table (read when used, so a
    method registered before the parser is built gets its subcommand)."""
    return {a.command: a.name for a in ALGORITHMS.values()}


def _ppo_parser(description: str, defaults: dict | None = None) -> ArgumentParser:
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the keys below")
    parser.add_class_arguments(PPOConfig, as_group=False)
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def _report_parser() -> ArgumentParser:
    parser = ArgumentParser(description="One run folder: rebuild RUN_DIR/report/ (plots and report.html). Several: "
                                        "draw their curves on the same axes, with a table of their summaries and "
                                        "of the config keys they differ in, in one report.html.")
    parser.add_argument("run_dirs", nargs="+", help="run folders holding metrics.jsonl (and samples.jsonl, "
                                                    "config.yaml)")
    parser.add_argument("--output", default=None,
                        help="where the comparison's report.html goes (its plots beside it); default: "
                             "FIRST_RUN/compare/report.html. With one run folder: write that run's report there "
                             "instead of RUN_DIR/report/")
    return parser


def _reward_parser() -> ArgumentParser:
    from tether.reward_config import RewardConfig

    parser = ArgumentParser(description="Train a reward model (one scalar output) on preference pairs or "
                                        "scalar-labelled texts; save it in save_pretrained form.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the keys below")
    parser.add_class_arguments(RewardConfig, as_group=False)
    return parser


def _inspect_reward_parser() -> ArgumentParser:
    from tether.reward_config import InspectRewardConfig

    parser = ArgumentParser(description="Score chosen texts, summarise a reward's scores over a dataset "
                                        "(with a histogram), and measure how much the prompt alone explains.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the keys below")
    parser.add_class_arguments(InspectRewardConfig, as_group=False, skip={"texts"})
    # nargs: `--texts "a good one" "a bad one"` reads as a shell user expects (jsonargparse's list[str] wants JSON)
    parser.add_argument("--texts", nargs="+", type=str, default=None,
                        help="texts to score one by one, e.g. a clearly positive and a clearly negative one")
    return parser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="tether", description="RLHF for transformer language models.")
    commands = parser.add_subcommands(dest="command")
    for a in ALGORITHMS.values():
        commands.add_subcommand(a.command, _ppo_parser(a.description, {"algorithm": a.name}), help=a.help)
    commands.add_subcommand("demo", _ppo_parser(
        "Offline demo: PPO on SmolLM2-135M-Instruct toward positive movie reviews, scored by VADER. Takes the "
        "same keys as `tether ppo` (`algorithm` picks grpo, rloo or reinforce++ instead); model, prompts and "
        "reward default to the demo's.", DEMO_DEFAULTS),
        help="the offline sentiment demo on SmolLM2")
    commands.add_subcommand("report", _report_parser(), help="rebuild a run folder's report")
    commands.add_subcommand("reward", _reward_parser(), help="train a reward model")
    commands.add_subcommand("inspect-reward", _inspect_reward_parser(), help="what does a reward reward?")
    return parser


def config_from_args(args, command: str = "ppo") -> PPOConfig:
    keys = {k: v for k, v in vars(args).items() if k in PPOConfig.__dataclass_fields__}
    wanted = algorithm_commands().get(command)
    if wanted is not None and keys.get("algorithm", wanted) != wanted:
        raise ValueError(f"`tether {command}` runs algorithm={wanted!r}, but the config sets algorithm="
                         f"{keys['algorithm']!r}; use `tether {_command_for(keys['algorithm'])}` for that")
    return PPOConfig(**keys)


def _command_for(algorithm: str) -> str:
    return next((cmd for cmd, algo in algorithm_commands().items() if algo == algorithm), "ppo")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_library_progress()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):  # a bare `--resume` means resume=true
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv[i] = "--resume=true"
    argv = _list_flags(argv)
    args = parser.parse_args(argv)
    sub = args[args.command]
    try:
        if args.command == "report":
            from tether.report import build_comparison, build_report

            runs = sub.run_dirs
            if len(runs) == 1:
                print(f"report: {build_report(runs[0], sub.output)}")
            else:
                output = sub.output or Path(runs[0]) / "compare" / "report.html"
                print(f"comparison of {len(runs)} runs: {build_comparison(runs, output)}")
        elif args.command in ("reward", "inspect-reward"):
            _reward_command(args.command, sub)
        else:
            config = config_from_args(sub, args.command)
            with hold_output_dir(config.output_dir, launched_as_main()):  # a second launch: refused before loading
                if args.command == "demo":
                    from tether.demo import demo_trainer

                    trainer = demo_trainer(config)
                else:
                    from tether.trainers import trainer_class

                    trainer = trainer_class(config.algorithm)(config)
                history = trainer.train()
            if trainer.comm.is_main:  # one summary, not one per process
                _summary(config.output_dir, history)
    except (ValueError, TypeError, FileNotFoundError, ImportError, RewardError, TrainingHalted,
            TrackerError, CheckpointWriteError) as err:
        # Errors about the user's input end in one clear line; anything else keeps its traceback.
        print(f"tether {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


LIST_FLAGS = ("--report_to", "--tracker_tags")


def _list_flags(argv: list[str]) -> list[str]:
    """`--report_to wandb,tensorboard` (and `--report_to none`) as a shell user writes them: jsonargparse's
    list[str] wants `[wandb,tensorboard]`, which is still accepted."""
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg in LIST_FLAGS and not argv[i + 1].lstrip().startswith("["):
            argv[i + 1] = "[" + ",".join(part.strip() for part in argv[i + 1].split(",")) + "]"
    return argv


def _reward_command(command: str, sub) -> None:
    """`tether reward` and `tether inspect-reward`, kept apart from the PPO commands."""
    from tether.reward_config import InspectRewardConfig, RewardConfig, resolve_device

    if command == "reward":
        from tether.trainers.reward import RewardTrainer

        config = RewardConfig(**{k: v for k, v in vars(sub).items() if k in RewardConfig.__dataclass_fields__})
        with hold_output_dir(config.output_dir):
            history = RewardTrainer(config).train()
        if history:
            last = {k: round(v, 4) for k, v in history[-1].items() if k != "step"}
            print(f"done: step {history[-1]['step']}, {last}")
        print(f"reward model: {config.output_dir}  (use it as `reward: {config.output_dir}` in a PPO config)")
        return
    from tether.rewards import resolve_reward
    from tether.report.reward_inspect import describe, inspect_reward

    config = InspectRewardConfig(**{k: v for k, v in vars(sub).items()
                                    if k in InspectRewardConfig.__dataclass_fields__})
    reward = resolve_reward(config.reward, resolve_device(config.device), config.batch_size)
    record = inspect_reward(reward, config.texts, config.data, config.output_dir, config.max_rows, config.reward)
    print(describe(record))
    print(f"written: {Path(config.output_dir) / 'reward_inspect.json'}")


def _quiet_library_progress() -> None:
    """One live bar on the console, tether's: no weight-loading or dataset-split bars beside it, and no
    DeepSpeed warning that it found no GPU (it is imported through Accelerate whenever it is installed) on a
    machine that has none: it picks the CPU then, as this says explicitly."""
    import os

    import datasets
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _summary(output_dir: str, history: list[dict]) -> None:
    if not history:
        print(f"nothing to do: the run in {output_dir} has already reached `steps` (raise --steps to continue it, "
              f"or choose a new --output_dir).\nreport: {Path(output_dir) / 'report' / 'report.html'}")
        return
    rewards = [h["env/reward_mean"] for h in history]
    k = min(3, len(rewards))
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    kls = [h["objective/kl"] for h in history]
    seconds = sum(h["time/step"] for h in history)
    print(f"done: {len(history)} steps in {seconds:.0f} s. Mean reward {first:.3f} -> {last:.3f} "
          f"(first {k} vs last {k} steps, {last - first:+.3f}); objective/kl {min(kls):.2f}..{max(kls):.2f} "
          f"({'inside' if all(0 <= x <= 10 for x in kls) else 'OUTSIDE'} the [0, 10] band).\n"
          f"run folder: {output_dir}\nreport:     {Path(output_dir) / 'report' / 'report.html'}")
    held_out = _held_out(Path(output_dir) / "metrics.jsonl")
    if held_out:
        print("held-out eval/reward_mean (greedy): " + ", ".join(f"step {s}: {v:.3f}" for s, v in held_out))


def _held_out(metrics: Path) -> list[tuple[int, float]]:
    """(step, eval/reward_mean) of every held-out evaluation in a run's metrics.jsonl."""
    import json

    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    return [(r["step"], r["eval/reward_mean"]) for r in records if r.get("eval/reward_mean") is not None]


if __name__ == "__main__":
    sys.exit(main())
