"""A sequence-classification folder as the reward: its own tokenizer, scalar head, left truncation."""

import pytest
import torch
from conftest import make_model, make_tokenizer
from transformers import GPT2Config, GPT2ForSequenceClassification

from tether import PPOConfig
from tether.rewards import RewardModel, resolve_reward
from tether.trainers import PPOTrainer


def save_reward_model(path, num_labels=1):
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=32, num_labels=num_labels,
                        pad_token_id=tok.pad_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_model_folder_scores_prompt_plus_completion(tmp_path):
    reward = resolve_reward(str(save_reward_model(tmp_path / "rm")), batch_size=2)
    assert isinstance(reward, RewardModel)
    scores = reward(["the movie was", "i", "a story"], [" good", " bad bad", " fun"])
    assert len(scores) == 3 and len(set(scores)) == 3
    # batching does not change a score (padding is masked)
    assert reward(["i"], [" bad bad"])[0] == pytest.approx(scores[1], abs=1e-5)


def test_long_text_is_cut_from_the_left_so_the_completion_survives(tmp_path):
    reward = resolve_reward(str(save_reward_model(tmp_path / "rm")))
    long_prompt = " ".join(["the"] * 100)  # the reward model sees 32 positions
    a, b = reward([long_prompt, long_prompt], [" good fun", " awful dull"])
    assert a != b


def test_reward_model_with_two_labels_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has 2 outputs; tether needs a scalar reward model"):
        resolve_reward(str(save_reward_model(tmp_path / "rm", num_labels=2)))


def test_ppo_with_reward_model_folder(tmp_path):
    tok = make_tokenizer()
    cfg = PPOConfig(steps=1, batch_size=4, minibatch_size=2, max_new_tokens=5, output_dir=str(tmp_path / "run"),
                    reward=str(save_reward_model(tmp_path / "rm")))
    history = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=["the movie", "i", "a", "we"]).train()
    assert len(history) == 1
