"""Where the KL acts and what it is there.

In the loss: the KL term compares the policy and the reference at the sampling temperature, untruncated, so a
sampled token that the updated policy's top-k / top-p no longer keeps (log-prob -inf under the sampler) still has
a finite KL term, and training with top-k / top-p and the KL in the loss skips no minibatch.
In the reward: only k1's policy gradient is the KL's; the exact KL gives the sampled token none and is refused.
"""

import math
from dataclasses import replace

import pytest
import torch
from conftest import assert_close64, make_model, make_tokenizer
from test_ppo_learns import PROMPTS

from tether import PPOConfig
from tether.losses import kl_penalty
from tether.ops import gather_logprobs
from tether.ops.kl import kl_abs, kl_k1, kl_k3, kl_mse
from tether.rollout import Sampler
from tether.trainers import GRPOTrainer, ReinforcePPTrainer
from tether.trainers.optimise import micro_loss


# ---- the KL term of the loss --------------------------------------------------------------------
def test_kl_term_of_a_token_outside_the_truncated_support_by_hand():
    """Vocabulary of 3, policy logits (2, 1, 0), top_k=2, sampled token 2 (outside the kept set); reference
    logits (0, 0, 0). Untruncated log pi(2) = -logsumexp(2, 1, 0) = -2.4076060; log ref(2) = -ln 3 = -1.0986123;
    r = log ref - log pi = 1.3089937; k3 = e^r - 1 - r = 1.3934523, k2 = r^2 / 2 = 0.8567322, abs = 1.3089937."""
    sampler = Sampler([0], top_k=2)
    logits = torch.tensor([[[2.0, 1.0, 0.0]]])
    token, mask = torch.tensor([[2]]), torch.ones(1, 1)
    processed = sampler.sequence_scores(logits, torch.tensor([[1, 2]]), torch.ones(1, 2))
    assert gather_logprobs(processed, token).item() == -math.inf  # what the old KL term was handed
    policy = gather_logprobs(sampler.reference_scores(logits), token)
    ref = gather_logprobs(sampler.reference_scores(torch.zeros(1, 1, 3)), token)
    assert_close64(policy, [[-2.4076059644]], atol=1e-6)
    for estimator, expected in ((kl_k3, 1.3934523000), (kl_mse, 0.5 * 1.3089936758**2), (kl_abs, 1.3089936758)):
        loss, stats = kl_penalty(policy, ref, mask, estimator)
        assert_close64(loss, expected, atol=1e-6)
        loss, stats = kl_penalty(policy, ref, mask, estimator, weights=0.5 * mask)  # half the minibatch's weight
        assert_close64(stats["loss"], 0.5 * expected, atol=1e-6)
        assert_close64(loss, 0.5 * expected, atol=1e-6)


def test_trainer_kl_term_is_the_untruncated_formula_when_tokens_left_the_support(tmp_path):
    """After the policy moves, many sampled tokens fall outside its top-1 set; the trainer's KL term is still
    the token mean of k3 on log softmax(logits / T) against the rollout's reference log-probs."""
    tok = make_tokenizer()
    cfg = PPOConfig(algorithm="grpo", batch_size=8, num_generations=4, minibatch_size=8, max_new_tokens=6,
                    top_k=1, temperature=0.7, seed=1, output_dir=str(tmp_path))
    trainer = GRPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)
    gen = trainer.generate(["the movie was"] * 4 + ["i really"] * 4)
    batch = trainer.score(gen.queries, gen.responses)
    with torch.no_grad():  # the update moved the policy: its argmax changes at many positions
        for p in trainer.policy.model.transformer.h.parameters():
            p.add_(0.5 * torch.randn_like(p, dtype=torch.float32))
    batch = replace(batch, advantages=torch.zeros_like(batch.mask))
    token_mean = batch.mask / batch.mask.sum()
    loss, parts = micro_loss(trainer.learner, batch.rows(torch.arange(8)), 1.0, token_mean, token_mean)
    assert parts["ppo/policy/"]["left_support_frac"] > 0.2  # the case at hand, not a lucky batch
    assert torch.isfinite(loss)
    with torch.no_grad():
        logits, _ = trainer.trainable(batch.query_ids, batch.query_mask, batch.response_ids)
        logp = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, batch.response_ids[..., None])[..., 0]
        r = batch.ref_logprobs.double() - logp
        expected = ((torch.exp(r) - 1 - r) * batch.mask).sum() / batch.mask.sum()
    assert_close64(parts["ppo/kl_loss/"]["loss"], expected, atol=1e-5)


@pytest.mark.parametrize("truncation", [{"top_k": 3}, {"top_p": 0.8}])
def test_kl_in_loss_with_truncated_sampling_trains_without_skips(truncation, tmp_path):
    """The review's failure: GRPO defaults (KL in the loss, k3), top-k or top-p, a learning rate that moves the
    policy within a step: 15 of 16 minibatches were skipped as faults and the run halted at step 3."""
    tok = make_tokenizer()
    cfg = PPOConfig(algorithm="grpo", steps=5, batch_size=16, minibatch_size=4, ppo_epochs=4, max_new_tokens=8,
                    learning_rate=1e-2, init_kl_coef=0.3, seed=0, output_dir=str(tmp_path), **truncation)
    reward = lambda prompts, completions: [float(len(c.split())) for c in completions]  # noqa: E731
    history = GRPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=PROMPTS, reward=reward).train()
    assert len(history) == 5
    assert [h["faults/skipped_minibatches"] for h in history] == [0.0] * 5
    assert all(math.isfinite(h["ppo/loss/kl"]) and h["ppo/loss/kl"] >= 0 for h in history)
    assert max(h["ppo/policy/left_support_frac"] for h in history) > 0  # tokens did leave the support


# ---- the KL in the reward -----------------------------------------------------------------------
def test_only_k1_as_a_reward_has_the_kl_gradient():
    """One-token completions, every token enumerated. A reward -k(a), k held fixed (rewards are not
    differentiated), gives the policy gradient sum_a pi(a) (-k(a)) grad log pi(a). The KL's own gradient is
    -grad KL(pi || ref). k1 gives it exactly; the exact KL (a constant over a) gives zero: no pull at all on the
    token it is charged to; k2, k3 and abs give something else."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(theta, -1)
    (true,) = torch.autograd.grad(-(logp.exp() * (logp - ref_logp)).sum(), theta, retain_graph=True)

    def reward_gradient(k: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad((logp.exp().detach() * -k.detach() * logp).sum(), theta, retain_graph=True)
        return grad

    assert_close64(reward_gradient(kl_k1(logp, ref_logp)), true, atol=1e-12)
    exact = (logp.exp() * (logp - ref_logp)).sum().expand(6)
    assert_close64(reward_gradient(exact), torch.zeros(6), atol=1e-12)
    for fn in (kl_mse, kl_k3, kl_abs):
        assert (reward_gradient(fn(logp, ref_logp)) - true).norm() > 0.1 * true.norm(), fn.__name__


def test_full_in_the_reward_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"kl_estimator=full is refused: .*gradient at that token is zero.*Use kl"):
        PPOConfig(kl_estimator="full")


@pytest.mark.parametrize("estimator", ["abs", "mse", "k2", "k3"])
def test_biased_estimators_in_the_reward_warn(estimator):
    with pytest.warns(UserWarning, match=f"kl_estimator={estimator} in the reward: .*kl \\(k1\\) is the estimator"):
        PPOConfig(kl_estimator=estimator)


def test_k1_in_the_reward_pulls_a_displaced_policy_back(tmp_path):
    """Zero reward, policy pushed away from its reference: the only signal is -beta * k1 in the reward, and
    over 20 steps it brings the exact KL down."""
    tok = make_tokenizer()
    cfg = PPOConfig(algorithm="reinforce++", steps=20, batch_size=16, minibatch_size=8, max_new_tokens=6,
                    learning_rate=3e-3, init_kl_coef=1.0, seed=0, output_dir=str(tmp_path))
    trainer = ReinforcePPTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=PROMPTS,
                                 reward=lambda prompts, completions: [0.0] * len(completions))
    with torch.no_grad():  # KL about 4.7 nats per completion at the start
        head = trainer.policy.model.lm_head.weight
        head.add_(0.1 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
    kls = [h["objective/kl"] for h in trainer.train()]
    first, last = sum(kls[:3]) / 3, sum(kls[-3:]) / 3
    assert first > 2 and last < 0.25 * first, kls  # measured: 4.65 -> 0.29 (seed 0)
