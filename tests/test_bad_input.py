"""Bad input gets a clear error that says what and where, before a weight changes."""

import pytest
import rewards_for_tests as rewards
import torch
from conftest import make_model, make_tokenizer
from transformers.generation import logits_process as lp

from tether import PPOConfig
from tether.trainers import PPOTrainer

PROMPTS = ["the movie was", "i really", "a story", "we"]


def trainer(tmp_path, prompts=PROMPTS, reward=rewards.count_good, tokenizer=None, **overrides):
    tok = tokenizer or make_tokenizer()
    cfg = PPOConfig(**{"batch_size": 4, "minibatch_size": 2, "max_new_tokens": 6, "steps": 1,
                       "output_dir": str(tmp_path), **overrides})
    return PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=prompts, reward=reward)


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 10, "minibatch_size": 4}, "minibatch_size=4 does not divide batch_size=10"),
    ({"minibatch_size": 4, "gradient_accumulation_steps": 3}, "gradient_accumulation_steps=3 does not divide"),
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"temperature": 0}, "temperature=0 must be > 0"),
    ({"kl_estimator": "k9"}, "kl_estimator='k9' is not one of"),
    ({"min_new_tokens": 40, "max_new_tokens": 8}, "min_new_tokens=40 exceeds max_new_tokens=8"),
    ({"generation_kwargs": {"num_beams": 4}}, "num_beams=4 is refused: beam search"),
    ({"generation_kwargs": {"do_sample": False}}, "do_sample=False is refused: greedy"),
    ({"generation_kwargs": {"top_k": 5}}, "set the config key `top_k` instead"),
    ({"generation_kwargs": {"watermarking_config": {}}}, "watermarking_config is not a setting tether can replay"),
    ({"generation_kwargs": {"penalty_alpha": 0.6}}, "penalty_alpha=0.6 is refused: contrastive search"),
    ({"generation_kwargs": {"guidance_scale": 1.5}}, "guidance_scale=1.5 is refused: classifier-free guidance"),
    ({"generation_kwargs": {"assistant_model": "tiny"}}, "assistant_model='tiny' is refused: assisted"),
    ({"generation_kwargs": {"prompt_lookup_num_tokens": 3}}, "prompt_lookup_num_tokens=3 is refused: prompt-lookup"),
    ({"generation_kwargs": {"min_length": 5}}, "min_length=5 is refused: min_length counts prompt tokens too"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**overrides)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        PPOConfig(steps=0, learning_rate=-1.0, gamma=2.0)
    assert "steps=0" in str(err.value) and "learning_rate=-1.0" in str(err.value) and "gamma=2.0" in str(err.value)


def test_empty_prompt_list(tmp_path):
    with pytest.raises(ValueError, match="prompts is empty"):
        trainer(tmp_path, prompts=[])


def test_non_string_and_blank_prompts_name_the_row(tmp_path):
    with pytest.raises(TypeError, match="row 2: prompt must be a string, got int"):
        trainer(tmp_path, prompts=["a", "b", 3])
    with pytest.raises(ValueError, match="row 1: prompt is empty"):
        trainer(tmp_path, prompts=["a", "  "])


def test_prompt_file_without_prompt_column(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "the movie"}\n')
    with pytest.raises(ValueError, match="has no 'prompt' column"):
        trainer(tmp_path, prompts=str(path))


def test_prompt_longer_than_context(tmp_path):
    long_prompt = " ".join(["the"] * 60)  # the tiny model's context is 64 tokens; + 6 new tokens
    with pytest.raises(ValueError, match="prompt row 1 is 60 tokens; with max_new_tokens=6 that exceeds the model's "
                                         "context of 64"):
        trainer(tmp_path, prompts=["fine", long_prompt])


@pytest.mark.parametrize("reward, error, message", [
    (rewards.wrong_count, ValueError, "returned 3 scores for 4 completions"),
    (rewards.gives_text, TypeError, "returned 'high' \\(str\\) for completion 0"),
    (rewards.raises, RuntimeError, "reward function raised KeyError"),
])
def test_bad_rewards_stop_before_any_update(tmp_path, reward, error, message):
    """The reward goes bad at step 2, after step 1 has updated: the error leaves the weights as step 1 left them
    (step 2's update, which would move them, never runs)."""
    seen = []

    def bad_at_step_2(prompts, completions):
        seen.append({k: v.clone() for k, v in t.policy.state_dict().items()})  # the weights when it is called
        return [len(c) / 10 for c in completions] if len(seen) == 1 else reward(prompts, completions)

    t = trainer(tmp_path, reward=bad_at_step_2, steps=2)
    with pytest.raises(error, match=message):
        t.train()
    start, after_step_1, end = seen[0], seen[1], t.policy.state_dict()
    assert any(not torch.equal(start[k], after_step_1[k]) for k in start)  # step 1 did update
    assert all(torch.equal(after_step_1[k], end[k]) for k in end)


def test_reward_string_must_resolve(tmp_path):
    with pytest.raises(ValueError, match="neither `package.module:function` nor an existing folder"):
        trainer(tmp_path, reward="no_such_thing")
    with pytest.raises(ValueError, match="cannot import 'nope' from module 'rewards_for_tests'"):
        trainer(tmp_path, reward="rewards_for_tests:nope")


def test_reward_as_module_function_text(tmp_path):
    assert len(trainer(tmp_path, reward="rewards_for_tests:count_good").train()) == 1


def test_tokenizer_without_pad_token_uses_eos(tmp_path):
    tok = make_tokenizer(pad=False)
    t = trainer(tmp_path, tokenizer=tok)
    assert tok.pad_token_id == tok.eos_token_id
    assert len(t.train()) == 1
    # EOS pads the prompts on the left: each row is still scored as it is alone, unpadded
    from tether.models.policy import response_forward
    from tether.ops import gather_logprobs

    gen = t.generate(PROMPTS)
    batch = t.score(gen.queries, gen.responses)
    assert (batch.query_ids == tok.eos_token_id).any()  # rows of different lengths: some padding
    for i, (q, r) in enumerate(zip(gen.queries, gen.responses)):
        eos_at = (r == tok.eos_token_id).nonzero()
        assert len(eos_at) == 0 or eos_at[0].item() == len(r) - 1  # the padding token ends a completion
        with torch.no_grad():
            logits, _ = response_forward(t.policy.model, q[None], torch.ones_like(q[None]), r[None])
        torch.testing.assert_close(batch.logprobs[i, :len(r)], gather_logprobs(logits, r[None])[0], atol=1e-5, rtol=0)


def test_unknown_logits_processor_is_refused(tmp_path):
    class MyProcessor(lp.LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores

    tok = make_tokenizer()
    with pytest.raises(ValueError, match=r"\['MyProcessor'\] cannot be replayed"):
        PPOTrainer(PPOConfig(batch_size=4, minibatch_size=2), model=make_model(len(tok)), tokenizer=tok,
                   logits_processors=[MyProcessor()])


def test_step_checks_batch_and_scores(tmp_path):
    t = trainer(tmp_path)
    gen = t.generate(PROMPTS)
    with pytest.raises(ValueError, match="must equal batch_size=4"):
        t.step(gen.queries[:3], gen.responses[:3], [0.0] * 3)
    with pytest.raises(ValueError, match="step got 3 scores; it needs batch_size=4"):
        t.step(gen.queries, gen.responses, [0.0, 0.0, 0.0])
    with pytest.warns(UserWarning, match=r"the reward was nan for completion\(s\) \[2\]"):
        stats = t.step(gen.queries, gen.responses, [0.0, 0.0, float("nan"), 0.0])
    assert stats["faults/skipped_steps"] == 1


@pytest.mark.parametrize("overrides, message", [
    ({"adaptive_kl": True, "init_kl_coef": 0.0}, "adaptive_kl needs init_kl_coef > 0"),
    ({"batch_size": 1, "minibatch_size": 1}, "batch_size=1 cannot be whitened"),
    ({"lr_scheduler_type": "cosinus"}, "lr_scheduler_type='cosinus' is not one of"),
    ({"device": "gpu7"}, "device='gpu7' is not a torch device"),
])
def test_more_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**overrides)


def test_estimator_names_in_config_match_the_ops():
    import typing

    from tether.config import KLEstimatorName
    from tether.ops import ESTIMATORS

    assert set(typing.get_args(KLEstimatorName)) == set(ESTIMATORS) | {"full"}  # full: parsed, then refused


def test_step_rejects_bad_token_rows(tmp_path):
    t = trainer(tmp_path)
    gen = t.generate(PROMPTS)
    queries = list(gen.queries)
    queries[2] = torch.tensor([], dtype=torch.long)
    with pytest.raises(ValueError, match="query 2 has no tokens"):
        t.step(queries, gen.responses, [0.0] * 4)
    responses = list(gen.responses)
    responses[1] = torch.tensor([0.5, 1.0])
    with pytest.raises(TypeError, match="response 1: expected a 1-D tensor of token ids"):
        t.step(gen.queries, responses, [0.0] * 4)
    responses[1] = torch.tensor([3, 999])
    with pytest.raises(ValueError, match="response 1 holds token id 999, outside the model's vocabulary of 34"):
        t.step(gen.queries, responses, [0.0] * 4)
    with pytest.raises(ValueError, match="query 0 has no tokens"):
        t.generate([torch.tensor([], dtype=torch.long)])


def test_processor_with_a_config_key_is_refused():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="pass TemperatureLogitsWarper as the config key `temperature`"):
        PPOTrainer(PPOConfig(batch_size=4, minibatch_size=2), model=make_model(len(tok)), tokenizer=tok,
                   logits_processors=[lp.TemperatureLogitsWarper(0.5)])


def test_a_model_whose_forward_takes_no_position_ids_is_refused(tmp_path):
    from transformers import GPT2LMHeadModel

    class NoPositions(GPT2LMHeadModel):  # as ALiBi models (Bloom): positions come from the mask alone
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    tok = make_tokenizer()
    model = NoPositions(make_model(len(tok)).config)
    with pytest.raises(ValueError, match="NoPositions.forward takes no position_ids"):
        PPOTrainer(PPOConfig(batch_size=4, minibatch_size=2, output_dir=str(tmp_path)), model=model, tokenizer=tok)


def test_reference_with_another_vocabulary_is_refused():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match=r"reference model's vocabulary \(40\) differs from the policy's \(34\)"):
        PPOTrainer(PPOConfig(batch_size=4, minibatch_size=2), model=make_model(len(tok)), tokenizer=tok,
                   ref_model=make_model(40))


def test_prompts_from_csv_and_dataset(tmp_path):
    from datasets import Dataset

    from tether.data import load_prompts

    path = tmp_path / "p.csv"
    path.write_text('id,text\n1,"the movie, honestly"\n2,i really\n')
    assert load_prompts(str(path), column="text") == ["the movie, honestly", "i really"]
    assert load_prompts(Dataset.from_dict({"prompt": ["a", "b"]})) == ["a", "b"]
    with pytest.raises(ValueError, match=r"expected one of \['.csv', '.json', '.jsonl'\]"):
        load_prompts(str(tmp_path / "p.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("reward, message", [
    (rewards.gives_nan, r"the reward was nan for completion\(s\) \[0\]"),
    (rewards.gives_inf, r"the reward was inf for completion\(s\) \[3\]"),
])
def test_nan_or_inf_reward_skips_updates_then_halts(tmp_path, reward, message):
    from tether.trainers.guards import TrainingHalted

    t = trainer(tmp_path, reward=reward, steps=5, max_faults_in_row=2)
    before = {k: v.clone() for k, v in t.policy.state_dict().items()}
    with pytest.warns(UserWarning, match="step 1 skipped"), pytest.raises(TrainingHalted, match="stopped at step 2: 2 steps in a row"):
        t.train()
    assert all(torch.equal(before[k], v) for k, v in t.policy.state_dict().items())
    assert t.faults.skipped_steps == 2


def test_reward_exception_names_the_offending_pair():
    from tether.rewards import RewardError, score_batch

    with pytest.raises(RewardError, match=r"ZeroDivisionError.*on completion 1\. Prompt: 'b' Completion: 'x y z'"):
        score_batch(rewards.fails_on_long, ["a", "b", "c"], ["x", "x y z", "y"])
