"""Parts of the offline sentiment demo: VADER as the reward, review openings as prompts.

The demo (after TRL's gpt2-sentiment example) asks a model to continue the
start of a movie review and rewards positive continuations. Here both halves
work without a network: VADER is a lexicon shipped inside its PyPI package, and
the prompts are openings written for tether (`data/movie_review_openings.txt`),
not taken from IMDB.
"""

from __future__ import annotations

import functools
from importlib.resources import files

OPENINGS_FILE = "movie_review_openings.txt"


@functools.lru_cache(maxsize=1)
def _analyzer():
    """One analyzer per process: building it parses the lexicon file (~7,500 entries)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as error:
        raise ModuleNotFoundError(
            "vader_reward needs the `vaderSentiment` package. Install it with: pip install vaderSentiment"
        ) from error
    return SentimentIntensityAnalyzer()


def vader_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """VADER compound score in [-1, 1] of each completion, the prompt left out.

    TRL's sentiment example scores prompt + response; tether scores the
    completion alone so that a strongly worded opening cannot earn reward the
    policy did not write (compound is not additive, so the prompt would
    otherwise shift every score by a different amount). `prompts` is taken for
    the common reward signature and only checked for length.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in completions]


def movie_review_openings() -> list[str]:
    """The demo's prompts: 4-12 word openings of movie reviews, one per line, no duplicates."""
    text = (files("tether") / "data" / OPENINGS_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


# Chosen so that `tether demo` finishes in under 8 minutes on a 2-core CPU (README has the measurements).
# Temperature 0.7 keeps SmolLM2's continuations coherent enough for their sentiment to be learnable in a
# few hundred episodes; the reference is scored at the same temperature, so the KL stays a true KL.
# 32 rollouts x 2 epochs costs what 16 x 4 does but gives a far less noisy step (measured on SmolLM2: +0.1 vs +0.4 reward over the run).
DEMO_PROMPTS = "tether.demo:movie_review_openings"  # importable names a config file can hold
DEMO_REWARD = "tether.demo:vader_reward"
DEMO_DEFAULTS = {
    "output_dir": "runs/demo",
    "prompts": DEMO_PROMPTS,
    "reward": DEMO_REWARD,
    "steps": 22,
    "batch_size": 32,
    "minibatch_size": 16,
    "ppo_epochs": 2,
    "learning_rate": 7e-5,
    "max_new_tokens": 16,
    "temperature": 0.7,
    "init_kl_coef": 0.05,
    "samples_every": 1,
    "resume": "auto",  # running the demo again continues (or reports) the run in runs/demo
}


def demo_trainer(config):
    """The trainer of `config.algorithm` for the demo: SmolLM2 unless `model` is set, the shipped openings
    unless `prompts` is set, VADER unless `reward` is set. All three are config keys (a path and two importable
    names), so the run folder's config.yaml repeats the run: `tether ppo --config RUN/config.yaml`."""
    from dataclasses import replace

    from tether.extras import check_extras
    from tether.models.smollm2 import smollm2_path
    from tether.trainers import trainer_class

    check_extras(config, demo=True)  # before SmolLM2 is converted or loaded
    config = replace(config, model=config.model or str(smollm2_path()), prompts=config.prompts or DEMO_PROMPTS,
                     reward=config.reward or DEMO_REWARD)
    return trainer_class(config.algorithm)(config)
