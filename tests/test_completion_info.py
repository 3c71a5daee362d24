"""A reward can tell a finished completion from a truncated one, and missing_eos_penalty charges the latter."""

import pytest
import torch
from conftest import make_model, make_tokenizer
from test_ppo_learns import PROMPTS

from tether import PPOConfig
from tether.rewards import COMPLETION_INFO, RewardError, accepted_keywords, score_batch
from tether.trainers import GRPOTrainer, PPOTrainer


def eos_likely_model(tok):
    model = make_model(len(tok), seed=3)
    with torch.no_grad():  # EOS's row along the mean last hidden state: P(EOS) about 0.2 after this prompt
        h = model.transformer(torch.tensor([tok("the movie was")["input_ids"]])).last_hidden_state.mean((0, 1))
        model.lm_head.weight[tok.eos_token_id] += 2 * h / h.norm() ** 2
    return model


def test_accepted_keywords_read_from_the_signature():
    def plain(prompts, completions): ...
    def named(prompts, completions, ended): ...
    def keyword_only(prompts, completions, *, completion_tokens, other=None): ...
    def everything(prompts, completions, **kwargs): ...

    assert accepted_keywords(plain) == ()
    assert accepted_keywords(named) == ("ended",)
    assert accepted_keywords(keyword_only) == ("completion_tokens",)
    assert accepted_keywords(everything) == tuple(COMPLETION_INFO) == ("ended", "completion_tokens")
    assert accepted_keywords(len) == ()  # no Python signature: the plain two arguments


def test_reward_sees_whether_each_completion_ended_and_its_length(tmp_path):
    tok = make_tokenizer()
    seen = {}

    def reward(prompts, completions, ended, completion_tokens):
        seen.update(ended=list(ended), tokens=list(completion_tokens), completions=list(completions))
        return [0.0] * len(completions)

    cfg = PPOConfig(steps=1, batch_size=8, minibatch_size=8, ppo_epochs=1, max_new_tokens=4, seed=0,
                    output_dir=str(tmp_path))
    trainer = PPOTrainer(cfg, model=eos_likely_model(tok), tokenizer=tok, prompts=["the movie was"] * 8,
                         reward=reward)
    generated = []
    original = trainer.generate
    trainer.generate = lambda queries: generated.append(original(queries)) or generated[-1]
    trainer.train()
    responses = generated[0].responses
    assert seen["ended"] == [r[-1].item() == tok.eos_token_id for r in responses]
    assert seen["tokens"] == [len(r) for r in responses]
    assert True in seen["ended"] and False in seen["ended"]  # both kinds, so the test can fail
    assert all(n == 4 for n, e in zip(seen["tokens"], seen["ended"]) if not e)


def test_reward_with_kwargs_gets_everything_and_plain_rewards_still_work(tmp_path):
    tok = make_tokenizer()
    got = []

    def reward(prompts, completions, **kwargs):
        got.append(sorted(kwargs))
        return [1.0] * len(completions)

    for fn in (reward, lambda prompts, completions: [1.0] * len(completions)):
        cfg = PPOConfig(steps=1, batch_size=4, minibatch_size=4, ppo_epochs=1, max_new_tokens=3,
                        output_dir=str(tmp_path / str(len(got))))
        history = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=PROMPTS, reward=fn).train()
        assert history[0]["env/reward_mean"] == 1.0
    assert got == [["completion_tokens", "ended"]]


def test_failing_reward_is_named_with_its_info_sliced_per_completion():
    def reward(prompts, completions, ended):
        assert len(ended) == len(completions)
        if not all(ended):
            raise ValueError("cut")
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"raised ValueError: cut on completion 1\."):
        score_batch(reward, ["p", "q"], ["a", "b"], {"ended": [True, False]})


def test_missing_eos_penalty_charges_truncated_completions(tmp_path):
    """Two completions of one prompt, one ended and one cut, rewarded alike (1.0). Without the penalty the
    GRPO advantages are 0 and so is the gradient; with missing_eos_penalty=0.5 the scores are 1.0 and 0.5."""
    tok = make_tokenizer()
    eos = tok.eos_token_id
    stats = {}
    for penalty in (0.0, 0.5):
        cfg = PPOConfig(algorithm="grpo", batch_size=2, num_generations=2, minibatch_size=2, ppo_epochs=1,
                        max_new_tokens=4, missing_eos_penalty=penalty, init_kl_coef=0.0, output_dir=str(tmp_path / str(penalty)))
        trainer = GRPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)
        query = trainer.generate(["the movie was"]).queries[0]
        words = torch.tensor(tok.convert_tokens_to_ids(["good", "fun", "film"]))
        responses = [torch.cat([words, torch.tensor([eos])]), torch.cat([words, words[:1]])]
        stats[penalty] = trainer.step([query, query], responses, [1.0, 1.0])
    assert stats[0.0]["ppo/grad_norm"] == 0.0 and stats[0.0]["objective/scores"] == 1.0
    assert stats[0.5]["env/reward_mean"] == 1.0  # what the reward said
    assert stats[0.5]["objective/scores"] == 0.75  # (1.0 + 0.5) / 2: the score RL saw
    assert stats[0.5]["ppo/grad_norm"] > 1e-3


def test_missing_eos_penalty_must_not_be_negative():
    with pytest.raises(ValueError, match=r"missing_eos_penalty=-1.0 must be >= 0"):
        PPOConfig(missing_eos_penalty=-1.0)
