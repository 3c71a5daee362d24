"""GRPO, RLOO and REINFORCE++ on the shared machinery: the estimators by hand, the trainers learning on a
tiny model with the KL bounded, the KL in the loss, and grouped rollouts."""

import pytest
import torch
from conftest import assert_close64, make_model, make_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ppo_learns import PROMPTS, assert_learned_with_kl_bounded, share_of, train_toward_good

from tether import PPOConfig
from tether.ops import group_centred, group_normalised, leave_one_out
from tether.trainers import GRPOTrainer, PPOTrainer, ReinforcePPTrainer, RLOOTrainer, trainer_class
from tether.trainers.scoring import TokenReplay


# ---- the estimators, by hand -------------------------------------------------------------------
def test_group_normalised_by_hand():
    # group 1: 1, 2, 3 -> mean 2, std (Bessel) 1; group 2: all 5 -> every advantage 0
    adv = group_normalised(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3, eps=0.0)
    assert_close64(adv[:3], [-1.0, 0.0, 1.0])
    assert torch.equal(group_normalised(torch.tensor([5.0, 5.0, 5.0]), 3), torch.zeros(3))


def test_leave_one_out_by_hand():
    # 1 - mean(2, 6) = -3; 2 - mean(1, 6) = -1.5; 6 - mean(1, 2) = 4.5
    assert_close64(leave_one_out(torch.tensor([1.0, 2.0, 6.0]), 3), [-3.0, -1.5, 4.5])


def test_group_centred_by_hand():
    assert_close64(group_centred(torch.tensor([1.0, 3.0, 10.0, 20.0]), 2), [-1.0, 1.0, -5.0, 5.0])


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.integers(0, 10_000))
def test_group_baselines_centre_each_group(group_size, groups, seed):
    scores = torch.randn(group_size * groups, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    loo = leave_one_out(scores, group_size).reshape(groups, group_size)
    # sum_i (r_i - (S - r_i) / (G - 1)) = S - (G S - S) / (G - 1) = 0
    assert_close64(loo.sum(-1), torch.zeros(groups), atol=1e-9)
    # leave-one-out is the centred score scaled by G / (G - 1)
    centred = group_centred(scores, group_size).reshape(groups, group_size)
    assert_close64(loo, centred * group_size / (group_size - 1), atol=1e-9)
    grpo = group_normalised(scores, group_size, eps=0.0).reshape(groups, group_size)
    assert_close64(grpo.mean(-1), torch.zeros(groups), atol=1e-9)
    assert_close64(grpo.std(-1), torch.ones(groups), atol=1e-9)


@pytest.mark.parametrize("fn", [group_normalised, leave_one_out])
def test_group_estimators_refuse_a_group_of_one(fn):
    with pytest.raises(ValueError, match="at least 2 completions per prompt"):
        fn(torch.tensor([1.0, 2.0]), 1)


def test_groups_must_tile_the_batch():
    with pytest.raises(ValueError, match="multiple of the group size 4"):
        leave_one_out(torch.tensor([1.0, 2.0, 3.0]), 4)


# ---- config ------------------------------------------------------------------------------------
def test_algorithm_defaults_fill_only_unset_keys():
    grpo = PPOConfig(algorithm="grpo", batch_size=8)
    assert (grpo.num_generations, grpo.kl_in_loss, grpo.kl_estimator, grpo.whiten_advantages) == (4, True, "k3", False)
    rloo = PPOConfig(algorithm="rloo", batch_size=8, num_generations=2, whiten_advantages=True)
    assert (rloo.num_generations, rloo.kl_in_loss, rloo.kl_estimator, rloo.whiten_advantages) == (2, False, "kl", True)
    ppo = PPOConfig()
    assert (ppo.num_generations, ppo.kl_in_loss, ppo.kl_estimator, ppo.whiten_advantages) == (1, False, "kl", True)


@pytest.mark.parametrize("keys, message", [
    ({"algorithm": "grpo", "num_generations": 1}, "num_generations must be >= 2"),
    ({"algorithm": "rloo", "batch_size": 6}, "num_generations=4 does not divide batch_size=6"),
    ({"algorithm": "grpo", "kl_estimator": "full"}, "kl_estimator=full is refused"),
    ({"algorithm": "grpo", "critic": "policy"}, "only ppo uses a critic"),
    ({"algorithm": "a2c"}, "algorithm='a2c' is not one of"),
])
def test_algorithm_config_errors(keys, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**keys)


def test_trainer_must_match_the_configs_algorithm(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(ValueError, match=r"GRPOTrainer runs algorithm='grpo' but the config says 'ppo'"):
        GRPOTrainer(PPOConfig(output_dir=str(tmp_path)), model=make_model(len(tok)), tokenizer=tok)
    assert trainer_class("rloo") is RLOOTrainer and trainer_class("reinforce++") is ReinforcePPTrainer


# ---- the trainers learn ------------------------------------------------------------------------
# Tiny GPT-2, reward = share of the word "good" (about 0.05 at the start). Chosen to hold on seeds 0, 1 and 2:
# reward gain 0.19-0.39 (grpo), 0.72-0.90 (rloo), 0.80-0.89 (reinforce++), KL at most 7.2, 8.7, 8.7.
LEARNING = {
    "grpo": {"learning_rate": 1e-3, "init_kl_coef": 0.3, "steps": 30},
    "rloo": {"learning_rate": 1e-3, "init_kl_coef": 0.05, "steps": 40},
    "reinforce++": {"learning_rate": 2e-3, "init_kl_coef": 0.05, "steps": 40},
}


@pytest.mark.parametrize("algorithm", sorted(LEARNING))
def test_critic_free_trainers_learn_with_kl_bounded(algorithm, tmp_path):
    history, trainer = train_toward_good(algorithm, tmp_path, **LEARNING[algorithm])
    assert trainer.policy.value_head is None and trainer.critic is None  # critic-free: nothing to value
    assert_learned_with_kl_bounded(history)
    assert "ppo/loss/value" not in history[-1] and "ppo/returns/mean" not in history[-1]
    assert ("ppo/loss/kl" in history[-1]) == (algorithm == "grpo")  # GRPO's KL is in the loss by default


def test_grouped_rollouts_repeat_each_prompt(tmp_path):
    tok = make_tokenizer()
    cfg = PPOConfig(algorithm="rloo", steps=1, batch_size=8, num_generations=4, minibatch_size=8,
                    max_new_tokens=4, output_dir=str(tmp_path))
    seen = []

    def reward(prompts, completions):
        seen.append(list(prompts))
        return [0.0] * len(prompts)

    RLOOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=PROMPTS, reward=reward).train()
    prompts = seen[0]
    assert len(prompts) == 8 and prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4
    assert prompts[0] != prompts[4]


def test_step_refuses_rows_that_break_groups(tmp_path):
    tok = make_tokenizer()
    cfg = PPOConfig(algorithm="grpo", batch_size=4, num_generations=2, minibatch_size=4, max_new_tokens=4,
                    output_dir=str(tmp_path))
    trainer = GRPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)
    gen = trainer.generate(["the movie was", "the movie was", "i really", "a story"])
    with pytest.raises(ValueError, match="rows 2..3 must be completions of one prompt, but query 3 differs"):
        trainer.step(gen.queries, gen.responses, [0.0, 1.0, 0.0, 1.0])


def test_rloo_step_uses_leave_one_out_advantages(tmp_path):
    """Without the KL (beta 0) and without whitening, each token's advantage is its completion's RLOO value."""
    tok = make_tokenizer()
    cfg = PPOConfig(algorithm="rloo", batch_size=4, num_generations=2, minibatch_size=4, ppo_epochs=1,
                    max_new_tokens=5, init_kl_coef=0.0, output_dir=str(tmp_path))
    trainer = RLOOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)
    gen = trainer.generate(["the movie was"] * 2 + ["i really"] * 2)
    batch = trainer.score(gen.queries, gen.responses)
    advantages, returns, _ = trainer.method.advantages(batch, torch.tensor([1.0, 3.0, 0.0, -2.0]), 0.0, cfg, None)
    assert returns is None
    expected = torch.tensor([-2.0, 2.0, 2.0, -2.0])[:, None] * batch.mask
    assert_close64(advantages, expected)


# ---- the KL in the loss ------------------------------------------------------------------------
def test_kl_in_loss_leaves_the_reward_alone_and_enters_the_loss(tmp_path):
    tok = make_tokenizer()
    stats = {}
    for in_loss in (False, True):
        cfg = PPOConfig(algorithm="grpo", batch_size=8, num_generations=4, minibatch_size=8, ppo_epochs=1,
                        max_new_tokens=6, kl_in_loss=in_loss, kl_estimator="k3", init_kl_coef=0.5, seed=3,
                        output_dir=str(tmp_path / str(in_loss)))
        trainer = GRPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)
        with torch.no_grad():  # move the policy away from its reference so that the KL is not 0
            for p in trainer.policy.model.transformer.h[0].parameters():
                p.add_(0.3 * torch.randn_like(p))
        gen = trainer.generate(["the movie was"] * 4 + ["i really"] * 4)
        stats[in_loss] = trainer.step(gen.queries, gen.responses, [float(i % 3) for i in range(8)])
    assert stats[True]["objective/non_score_reward"] == 0.0
    assert stats[False]["objective/non_score_reward"] < 0
    # first (only) minibatch: the policy is still the rollout policy, so the loss term is the rollout-time
    # k3 mean over tokens, weighted by beta
    with_kl = stats[True]
    assert with_kl["ppo/loss/kl"] > 0
    assert abs(with_kl["ppo/loss/total"] - (with_kl["ppo/loss/policy"] + 0.5 * with_kl["ppo/loss/kl"])) < 1e-6


def test_kl_in_loss_holds_the_policy_closer(tmp_path):
    tok = make_tokenizer()
    target = tok.convert_tokens_to_ids("good")
    final_kl = {}
    for beta in (0.0, 1.0):
        cfg = PPOConfig(algorithm="grpo", steps=12, batch_size=16, minibatch_size=8, max_new_tokens=8,
                        learning_rate=3e-3, init_kl_coef=beta, seed=0, output_dir=str(tmp_path / str(beta)))
        history = GRPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=PROMPTS,
                              reward=share_of(target, tok)).train()
        final_kl[beta] = sum(h["objective/kl"] for h in history[-4:]) / 4
    assert final_kl[1.0] < 0.5 * final_kl[0.0], final_kl


def test_ppo_with_kl_in_loss_runs(tmp_path):
    tok = make_tokenizer()
    cfg = PPOConfig(batch_size=4, minibatch_size=4, max_new_tokens=4, kl_in_loss=True, output_dir=str(tmp_path))
    trainer = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)
    gen = trainer.generate(PROMPTS[:4])
    stats = trainer.step(gen.queries, gen.responses, [0.0, 1.0, 0.0, 1.0])
    assert stats["objective/non_score_reward"] == 0.0 and "ppo/loss/value" in stats and "ppo/loss/kl" in stats


@pytest.mark.parametrize("keys, message", [
    ({"algorithm": "grpo", "gamma": 0.9}, "gamma=0.9 does nothing for grpo"),
    ({"algorithm": "rloo", "whiten_rewards": True}, "whiten_rewards=True does nothing for rloo"),
    ({"algorithm": "reinforce++", "lam": 0.9}, "lam=0.9 does nothing for reinforce\\+\\+"),
    ({"kl_in_loss": True, "kl_estimator": "kl"}, "the expected gradient of k1 is zero"),
])
def test_keys_an_algorithm_cannot_use_are_refused(keys, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**keys)


def test_a_bf16_checkpoint_is_trained_in_fp32(tmp_path):
    tok = make_tokenizer()
    make_model(len(tok)).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    trainer = PPOTrainer(PPOConfig(model=str(tmp_path / "bf16"), output_dir=str(tmp_path / "run")))
    assert {p.dtype for p in trainer.trainable.parameters()} == {torch.float32}


def test_kl_in_loss_ignores_padding_after_eos_even_under_top_k(tmp_path):
    """After-EOS padding is outside the mask, but under top-k its replayed log-prob is -inf: the loss's KL term
    must not see it (exp(inf) * 0 is nan, which would skip every update)."""
    tok = make_tokenizer()
    cfg = PPOConfig(algorithm="grpo", batch_size=4, num_generations=2, minibatch_size=4, max_new_tokens=6, top_k=2,
                    output_dir=str(tmp_path))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    model = make_model(len(tok))
    with torch.no_grad():  # EOS likely (about +6 on its logit), so that completions end early, on their own
        bias = model.transformer.ln_f.bias  # the final hidden state's offset: the EOS row along it
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)))
        model.lm_head.weight[eos] += 0.2 * bias
    trainer = GRPOTrainer(cfg, model=model, tokenizer=tok)
    gen = trainer.generate(["the movie was"] * 2 + ["i really"] * 2)
    assert gen.responses[0][-1] == eos and len(gen.responses[0]) < 6
    responses = list(gen.responses)
    responses[0] = torch.cat([responses[0], torch.tensor([pad, pad, pad])])  # padding the sampler never drew
    batch = trainer.score(gen.queries, responses)
    logits = trainer.trainable(batch.query_ids, batch.query_mask, batch.response_ids)[0]
    replay = TokenReplay(trainer.sampler, batch.query_ids, batch.query_mask, batch.response_ids)
    replayed = replay(logits, slice(0, len(logits)), slice(0, logits.shape[1]))["logprobs"]
    assert torch.isneginf(replayed[0][batch.mask[0] == 0]).any()  # the case at hand: padding replays to -inf
    stats = trainer.step(gen.queries, responses, [0.0, 1.0, 1.0, 0.0])
    assert stats["faults/skipped_minibatches"] == 0 and stats["ppo/loss/kl"] == stats["ppo/loss/kl"]
