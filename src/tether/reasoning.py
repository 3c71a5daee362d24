"""Offline reasoning prompts from `reasoning-gym` (procedural tasks with verifiers, pure Python, no download).

`task_rows` turns a reasoning-gym dataset into prompt rows tether trains on: a one-message conversation (the
question and an instruction), the reference `answer` and the `task` name as columns for the reward.
`held_out_split` dedupes the questions and splits them so that no held-out question is ever trained on.
`scripts/make_reasoning_prompts.py` writes the example's files with them (examples/data/chain_sum_*.jsonl)."""

import random

INSTRUCTION = " Answer with only the number."


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as err:
        raise ModuleNotFoundError("these prompts come from the `reasoning-gym` package: "
                                  "pip install 'tether[reasoning]'  (or: pip install reasoning-gym)") from err
    return reasoning_gym


def task_rows(task: str, size: int, seed: int = 0, instruction: str = INSTRUCTION, **task_config) -> list[dict]:
    """`size` rows of reasoning-gym's `task` (its config keys as keyword arguments), in its order."""
    dataset = _reasoning_gym().create_dataset(task, size=size, seed=seed, **task_config)
    return [{"prompt": [{"role": "user", "content": entry["question"] + instruction}], "answer": entry["answer"],
             "task": task} for entry in dataset]


def held_out_split(rows: list[dict], n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval): the distinct questions shuffled, the first n_eval held out; no question is in both."""
    distinct = list({row["prompt"][-1]["content"]: row for row in rows}.values())
    random.Random(seed).shuffle(distinct)
    if len(distinct) <= n_eval:
        raise ValueError(f"only {len(distinct)} distinct questions; cannot hold out {n_eval} and train on the rest")
    return distinct[n_eval:], distinct[:n_eval]


# The example task: sums and differences of two one-digit numbers (200 distinct questions). SmolLM2-135M-Instruct
# answers about a quarter of them right at the start (README, "An offline reasoning task").
CHAIN_SUM = {"task": "chain_sum", "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def chain_sum_split(n_eval: int = 64, seed: int = 0) -> tuple[list[dict], list[dict]]:
    config = dict(CHAIN_SUM)
    return held_out_split(task_rows(config.pop("task"), size=2000, seed=seed, **config), n_eval, seed)
