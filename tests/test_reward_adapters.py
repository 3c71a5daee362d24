"""Reward adapters: a reward model with its own tokenizer, weighted sums, query baseline, running
normalisation (with state), clipping, and the YAML spec that builds them for PPOConfig.reward."""

import json
import math

import pytest
import torch
import yaml
from conftest import WORDS, make_model, make_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

from tether import PPOConfig
from tether.rewards.compose import Clip, QueryBaseline, RunningNormalize, WeightedSum, compose, load_reward_spec
from tether.rewards import RewardModel, resolve_reward
from tether.trainers import PPOTrainer


def other_tokenizer() -> PreTrainedTokenizerFast:
    """Not the policy's: other ids for every word, extra words, its pad last, and left padding."""
    vocab = {"[UNK]": 0, "[SEP]": 1}
    for w in sorted(WORDS, reverse=True) + ["extra", "words", "here"]:
        vocab[w] = len(vocab)
    vocab["[PAD]"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[SEP]", padding_side="left")


def save_other_reward_model(path):
    tok = other_tokenizer()
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=48, num_labels=1,
                        pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=1)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def one_at_a_time(folder, text: str) -> float:
    """The reference: the reward model's own tokenizer, one unpadded text."""
    rm = RewardModel(str(folder))
    ids = rm.tokenizer(text, return_tensors="pt")
    return rm.model(**ids).logits[0, 0].item()


def test_reward_model_with_another_tokenizer_scores_the_decoded_text(tmp_path):
    folder = save_other_reward_model(tmp_path / "rm")
    policy_tok = make_tokenizer()
    assert policy_tok("good")["input_ids"] != other_tokenizer()("good")["input_ids"]
    tok = make_tokenizer()
    cfg = PPOConfig(steps=1, batch_size=4, minibatch_size=2, max_new_tokens=5, output_dir=str(tmp_path / "run"),
                    reward=str(folder), samples_per_step=4)
    trainer = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=["the movie", "i", "a", "we"])
    trainer.reward.batch_size = 3  # a padded batch of 3, then 1: batching must not change any score
    trainer.train()
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    with torch.no_grad():
        for s in samples:
            assert s["score"] == pytest.approx(one_at_a_time(folder, s["prompt"] + s["completion"]), abs=1e-4)


def test_reward_model_wraps_a_model_in_memory(tmp_path):
    folder = save_other_reward_model(tmp_path / "rm")
    loaded = RewardModel(str(folder))
    wrapped = RewardModel(model=loaded.model, tokenizer=loaded.tokenizer, batch_size=2)
    texts = ["the movie was good", "bad", "i really quite liked it"]
    assert wrapped.score_texts(texts) == pytest.approx(loaded.score_texts(texts), abs=1e-5)
    with pytest.raises(ValueError, match="needs both the model and its tokenizer"):
        RewardModel(model=loaded.model)


def length(prompts, completions):
    return [float(len(p) + len(c)) for p, c in zip(prompts, completions)]


def test_query_baseline_subtracts_the_prompt_alone_and_caches_it():
    calls = []

    def counted(prompts, completions):
        calls.append(list(completions))
        return length(prompts, completions)

    reward = QueryBaseline(counted)
    assert reward(["ab", "abc", "ab"], ["x", "yy", "zzz"]) == [1.0, 2.0, 3.0]
    assert calls[-1] == ["", ""]  # two distinct prompts scored alone, once each
    reward(["ab"], ["q"])
    assert calls[-1] == ["q"]  # cached


def test_running_normalize_matches_the_moments_and_round_trips_its_state():
    reward = RunningNormalize(length)
    first = reward([""] * 4, ["a", "bb", "ccc", "dddd"])
    assert first == pytest.approx(((torch.tensor([1.0, 2, 3, 4]) - 2.5) / 1.25**0.5).tolist())
    second = reward([""] * 2, ["a" * 9, "a" * 11])
    all_scores = torch.tensor([1.0, 2, 3, 4, 9, 11], dtype=torch.float64)
    mean, std = all_scores.mean(), all_scores.var(unbiased=False).sqrt()
    assert second == pytest.approx(((torch.tensor([9.0, 11.0], dtype=torch.float64) - mean) / std).tolist())

    restored = RunningNormalize(length)
    restored.load_state_dict(reward.state_dict())
    assert restored([""], ["abc"]) == pytest.approx(reward([""], ["abc"]))


def test_clip_and_weighted_sum():
    assert Clip(length, 2.0)([""] * 2, ["a", "abcde"]) == [1.0, 2.0]
    total = WeightedSum([(length, 2.0), (lambda p, c: [1.0] * len(c), -0.5)])
    assert total(["a"], ["bc"]) == [5.5]
    with pytest.raises(ValueError, match="clip limit must be > 0"):
        Clip(length, 0.0)


def test_weighted_sum_names_the_failing_component_and_passes_nan_on():
    total = WeightedSum([(length, 1.0), (lambda p, c: ["high"] * len(c), 1.0)])
    with pytest.raises(TypeError, match="reward component 1: the reward returned 'high'"):
        total(["a"], ["b"])
    # nan reaches the trainer (which skips that step's update) but never the running statistics
    flaky = iter([[1.0, float("nan")], [3.0, 5.0]])
    norm = RunningNormalize(lambda p, c: next(flaky))
    first = WeightedSum([(norm, 1.0)])(["a", "b"], ["c", "d"])
    assert first[0] == pytest.approx(0.0) and math.isnan(first[1])
    assert norm.state_dict()["count"] == 1
    assert norm([""] * 2, ["", ""]) == pytest.approx([0.0, 2.0 / (8 / 3) ** 0.5])  # moments of {1, 3, 5}


def test_yaml_spec_builds_the_composition_and_carries_state(tmp_path):
    spec = tmp_path / "rewards.yaml"
    spec.write_text(yaml.safe_dump({"components": [
        {"reward": "test_reward_adapters:length", "weight": 2.0, "query_baseline": True, "clip": 1.5},
        {"reward": "test_reward_adapters:length", "weight": 1.0, "normalize": True},
    ]}))
    reward = resolve_reward(str(spec))
    assert isinstance(reward, WeightedSum)
    expected_norm = ((torch.tensor([3.0, 5.0]) - 4.0) / 1.0).tolist()  # mean 4, population std 1
    assert reward(["ab", "ab"], ["x", "xyz"]) == pytest.approx([2 * 1.0 + expected_norm[0], 2 * 1.5 + expected_norm[1]])
    state = reward.state_dict()
    assert state["1"]["count"] == 2 and "0" not in state
    fresh = resolve_reward(str(spec))
    fresh.load_state_dict(state)
    assert fresh(["a"], ["b"]) == pytest.approx(reward(["a"], ["b"]))


def test_compose_order_is_baseline_normalise_clip():
    reward = compose(length, query_baseline=True, normalize=True, clip=0.5)
    assert isinstance(reward, Clip) and isinstance(reward.reward, RunningNormalize)
    assert isinstance(reward.reward.reward, QueryBaseline)


def test_yaml_spec_errors_list_every_problem(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"components": [
        {"reward": "", "weight": "heavy"},
        {"reward": "test_reward_adapters:length", "clip": -1, "normalise": True, "query_baseline": "yes"},
    ], "extra": 1}))
    with pytest.raises(ValueError) as err:
        load_reward_spec(spec, resolve_reward)
    message = str(err.value)
    for part in ("unknown top-level key 'extra'", "components[0]: `reward` must be", "weight='heavy' must be a number",
                 "components[1]: unknown key 'normalise'", "clip=-1 must be a number > 0",
                 "query_baseline='yes' must be true or false"):
        assert part in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_reward(str(tmp_path / "missing.yaml"))
    spec.write_text(yaml.safe_dump({"components": [{"reward": "test_reward_adapters:nope"}]}))
    with pytest.raises(ValueError, match=r"components\[0\]: reward 'test_reward_adapters:nope': cannot import"):
        load_reward_spec(spec, resolve_reward)


def test_ppo_uses_a_yaml_spec_with_a_reward_model_and_a_function(tmp_path):
    folder = save_other_reward_model(tmp_path / "rm")
    spec = tmp_path / "rewards.yaml"
    spec.write_text(yaml.safe_dump({"components": [
        {"reward": str(folder), "query_baseline": True, "normalize": True, "clip": 3.0},
        {"reward": "rewards_for_tests:count_good", "weight": 0.5},
    ]}))
    tok = make_tokenizer()
    cfg = PPOConfig(steps=2, batch_size=4, minibatch_size=2, max_new_tokens=5, output_dir=str(tmp_path / "run"),
                    reward=str(spec))
    trainer = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=["the movie", "i", "a", "we"])
    history = trainer.train()
    assert len(history) == 2
    assert trainer.reward.state_dict()["0"]["inner"]["count"] == 8  # normaliser saw both steps' 4 scores


def test_ppo_checkpoint_round_trips_the_reward_specs_normaliser(tmp_path):
    """A resumed run's reward normalises with the statistics the interrupted run had gathered, not from zero."""
    spec = tmp_path / "rewards.yaml"
    spec.write_text(yaml.safe_dump({"components": [{"reward": "rewards_for_tests:count_good", "normalize": True}]}))
    tok = make_tokenizer()

    def trainer(steps, resume):
        cfg = PPOConfig(steps=steps, batch_size=4, minibatch_size=2, max_new_tokens=5, reward=str(spec),
                        checkpoint_every=1, resume=resume, output_dir=str(tmp_path / "run"))
        return PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=["the movie", "i", "a", "we"])

    first = trainer(2, False)
    first.train()
    saved = first.reward.state_dict()
    assert saved["0"]["count"] == 8
    resumed = trainer(3, True)
    assert resumed.reward.state_dict()["0"]["count"] == 0  # fresh before resuming
    resumed.resume()
    assert resumed.reward.state_dict() == saved
