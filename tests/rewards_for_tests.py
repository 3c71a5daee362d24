"""Reward functions importable as `rewards_for_tests:NAME`, the way the CLI and YAML name them."""


def count_good(prompts, completions):
    return [text.split().count("good") / max(len(text.split()), 1) for text in completions]


def wrong_count(prompts, completions):
    return [0.0] * (len(completions) - 1)


def gives_nan(prompts, completions):
    return [float("nan")] + [0.0] * (len(completions) - 1)


def gives_inf(prompts, completions):
    return [0.0] * (len(completions) - 1) + [float("inf")]


def gives_text(prompts, completions):
    return ["high"] * len(completions)


def raises(prompts, completions):
    raise KeyError("no such label")


def fails_on_long(prompts, completions):
    return [1.0 / (len(c.split()) < 3) for c in completions]  # ZeroDivisionError for a completion of 3+ words


def length(prompts, completions):
    return [len(c) / 10 for c in completions]  # differs between completions from the first step
