"""One trainer step against numbers worked out by hand: score processing, the KL in the reward and its
controller, each method's advantages, the value loss's weight, a separate critic's clipping and where the
shared value head reads. Each test catches the batch the step hands to the optimiser (`trainers.base.optimise`)
and recomputes what it must hold with plain loops over the formulas written out below."""

import math

import pytest
import torch
from conftest import assert_close64, make_model, make_tokenizer

from tether import PPOConfig
from tether.models.policy import response_forward
from tether.trainers import base, trainer_class

GROUPED = ["the movie was", "the movie was", "i really", "i really"]
QUERIES = ["the movie was", "i really", "a story", "we"]


@pytest.fixture
def caught(monkeypatch):
    """Every (batch, beta) the step hands to optimise(), in order."""
    seen = []
    real = base.optimise

    def spy(learner, batch, beta):
        seen.append((batch, beta))
        return real(learner, batch, beta)

    monkeypatch.setattr(base, "optimise", spy)
    return seen


def make(tmp_path, prompts=QUERIES, value_seed=None, **keys):
    """A trainer whose reference (seed 1) differs from its policy (seed 0), so that the KL is not 0 at step 1."""
    tok = make_tokenizer()
    keys = {"batch_size": 4, "minibatch_size": 4, "ppo_epochs": 1, "max_new_tokens": 5, "output_dir": str(tmp_path),
            **keys}
    cfg = PPOConfig(**keys)
    trainer = trainer_class(cfg.algorithm)(cfg, model=make_model(len(tok)), ref_model=make_model(len(tok), seed=1),
                                           tokenizer=tok)
    head = trainer.policy.value_head
    if value_seed is not None and head is not None:  # the head starts at 0; values of 0 would hide V in GAE
        with torch.no_grad():
            g = torch.Generator().manual_seed(value_seed)
            head.weight.copy_(torch.randn(head.weight.shape, generator=g))
            head.bias.fill_(0.3)
    return trainer, trainer.generate(prompts)


def rows(batch):
    """Per row: its length L (the mask is 1 on a prefix), KL_t and values V_t, as float64 lists."""
    out = []
    for i in range(batch.mask.shape[0]):
        L = int(batch.mask[i].sum())
        assert batch.mask[i, :L].all() and not batch.mask[i, L:].any()
        out.append((L, batch.kl[i, :L].double().tolist(),
                    None if batch.values is None else batch.values[i, :L].double().tolist()))
    return out


def whiten(per_row, shift_mean=True):
    """(x - mean) / sqrt(var + 1e-8) over every token of every row, var with Bessel's correction; the mean put
    back when not shift_mean (masked_whiten)."""
    flat = [x for r in per_row for x in r]
    n = len(flat)
    mean = sum(flat) / n
    var = sum((x - mean) ** 2 for x in flat) / (n - 1)
    return [[(x - mean) / math.sqrt(var + 1e-8) + (0 if shift_mean else mean) for x in r] for r in per_row]


def as_rows(t, batch):
    return [t[i, :int(batch.mask[i].sum())].double().tolist() for i in range(t.shape[0])]


def assert_rows(got, want, atol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close64(g, w, atol=atol)


# ---- score processing ---------------------------------------------------------------------------
def test_score_scale_then_clip(tmp_path, caught):
    trainer, gen = make(tmp_path, score_scale=2.0, score_clip=1.5)
    trainer.step(gen.queries, gen.responses, [0.5, -1.0, 3.0, 0.2])
    # 2 * (0.5, -1, 3, 0.2) = (1, -2, 6, 0.4), clipped to [-1.5, 1.5]
    assert_close64(caught[0][0].scores, [1.0, -1.5, 1.5, 0.4])


def test_score_norm_uses_the_running_moments_of_every_step_so_far(tmp_path, caught):
    trainer, gen = make(tmp_path, score_scale=3.0, score_norm=True, score_clip=1.2)
    s1, s2 = [0.0, 1.0, 2.0, 5.0], [4.0, 4.5, -1.0, 0.5]
    trainer.step(gen.queries, gen.responses, s1)
    trainer.step(gen.queries, gen.responses, s2)

    def expected(seen, current):
        """x = 3 s; (x - mean) / std over every scaled score seen so far (population std), clipped at 1.2."""
        xs = [3 * s for s in seen]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
        return [max(-1.2, min(1.2, (3 * s - mean) / std)) for s in current]

    assert_close64(caught[0][0].scores, expected(s1, s1))  # step 1: (-1.069, -0.535, 0, 1.2 clipped from 1.604)
    assert_close64(caught[1][0].scores, expected(s1 + s2, s2))
    assert trainer.score_moments.count == 8


# ---- PPO: the KL in the reward, whitened rewards, GAE, whitened advantages ---------------------
def test_ppo_rewards_advantages_and_returns_by_hand(tmp_path, caught):
    beta, gamma, lam = 0.2, 0.9, 0.8
    trainer, gen = make(tmp_path, value_seed=0, init_kl_coef=beta, gamma=gamma, lam=lam, whiten_rewards=True)
    scores = [1.0, -0.5, 2.0, 0.0]
    stats = trainer.step(gen.queries, gen.responses, scores)
    batch, used_beta = caught[0]
    assert used_beta == beta
    # the reward's KL is k1 (the default estimator): log pi_old - log ref on each sampled token
    assert_close64(batch.kl, (batch.logprobs - batch.ref_logprobs) * batch.mask)
    per_row = rows(batch)
    assert all(any(abs(k) > 1e-3 for k in kl) for _, kl, _ in per_row)  # the reference really differs
    assert all(any(abs(v) > 1e-2 for v in values) for _, _, values in per_row)

    # R_t = -beta KL_t, + score at the last token (Ziegler et al. 2019); then whitened, keeping the mean
    rewards = []
    for (L, kl, _), s in zip(per_row, scores):
        r = [-beta * k for k in kl]
        r[L - 1] += s
        rewards.append(r)
    rewards = whiten(rewards, shift_mean=False)
    # GAE: delta_t = R_t + gamma V_{t+1} - V_t (V after the last token = 0); A_t = delta_t + gamma lam A_{t+1}
    advantages, returns = [], []
    for (L, _, V), r in zip(per_row, rewards):
        A = [0.0] * L
        for t in reversed(range(L)):
            next_v, next_a = (V[t + 1], A[t + 1]) if t + 1 < L else (0.0, 0.0)
            A[t] = r[t] + gamma * next_v - V[t] + gamma * lam * next_a
        advantages.append(A)
        returns.append([a + v for a, v in zip(A, V)])  # the critic's target: A_t + V_t, before whitening
    assert_rows(as_rows(batch.returns, batch), returns)
    assert_rows(as_rows(batch.advantages, batch), whiten(advantages))
    assert_rows(as_rows(batch.non_score, batch), [[-beta * k for k in kl] for _, kl, _ in per_row])
    assert stats["objective/non_score_reward"] == pytest.approx(
        sum(-beta * sum(kl) for _, kl, _ in per_row) / 4, abs=1e-6)


def test_adaptive_kl_steers_on_the_exact_kl_with_target_and_horizon(tmp_path, caught):
    probe, gen = make(tmp_path / "probe")
    first = probe.score(gen.queries, gen.responses)
    exact = first.kl_exact.sum(-1).mean().item()  # objective/kl: sum_t KL(pi || ref) over the vocabulary
    estimate = first.kl.sum(-1).mean().item()  # k1 on the sampled tokens: what the controller must not see
    target, horizon, beta0 = exact / 1.1, 8.0, 0.1
    # fed the estimate instead, the error would be visibly different (and so the new beta)
    assert abs(min(max(estimate / target - 1, -0.2), 0.2) - 0.1) > 0.01, (exact, estimate)

    trainer, gen = make(tmp_path / "run", adaptive_kl=True, init_kl_coef=beta0, kl_target=target, kl_horizon=horizon)
    s1 = trainer.step(gen.queries, gen.responses, [0.0, 1.0, 0.0, 1.0])
    # Ziegler et al. 2019: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta (1 + e B / horizon), B = 4
    beta1 = beta0 * (1 + 0.1 * 4 / horizon)  # e = 1.1 - 1
    assert s1["objective/kl"] == pytest.approx(exact, abs=1e-6)
    assert s1["objective/kl_coef"] == beta0 and caught[0][1] == beta0
    assert trainer.kl_ctl.value == pytest.approx(beta1, rel=1e-6)
    s2 = trainer.step(gen.queries, gen.responses, [0.0, 1.0, 0.0, 1.0])
    batch2, used = caught[1]
    assert used == pytest.approx(beta1, rel=1e-6) and s2["objective/kl_coef"] == pytest.approx(beta1, rel=1e-6)
    assert_close64(batch2.non_score, -beta1 * batch2.kl * batch2.mask)  # step 2's reward uses the new beta
    e2 = min(max(batch2.kl_exact.sum(-1).mean().item() / target - 1, -0.2), 0.2)
    assert trainer.kl_ctl.value == pytest.approx(beta1 * (1 + e2 * 4 / horizon), rel=1e-6)


def test_vf_coef_weights_the_value_loss_in_the_gradient(tmp_path, caught):
    """First (only) update: V_theta = V_old, so the clipped value loss is 0.5 mean_t (V_t - R_t)^2 and the value
    head's gradient is vf_coef / N sum_t (V_t - R_t) h_t, h_t the last hidden state that V_t reads."""
    vf_coef = 0.25
    trainer, gen = make(tmp_path, value_seed=0, vf_coef=vf_coef, max_grad_norm=0.0)
    first = trainer.score(gen.queries, gen.responses)
    with torch.no_grad():
        _, hidden = response_forward(trainer.policy.model, first.query_ids, first.query_mask, first.response_ids,
                                     hidden=True)
    grads = []
    trainer.policy.value_head.weight.register_hook(lambda g: grads.append(g.clone()))
    trainer.step(gen.queries, gen.responses, [1.0, -0.5, 2.0, 0.0])
    batch = caught[0][0]
    m = batch.mask.bool()
    residual = (batch.values - batch.returns)[m].double()  # V_t - R_t on the N masked tokens
    expected = vf_coef * (residual[:, None] * hidden[m].double()).sum(0) / m.sum()
    assert len(grads) == 1
    assert_close64(grads[0][0], expected, atol=1e-6)
    assert expected.abs().max() > 1e-3


# ---- the critic-free methods' advantages -------------------------------------------------------
def test_grpo_advantages_by_hand(tmp_path, caught):
    trainer, gen = make(tmp_path, prompts=GROUPED, algorithm="grpo", num_generations=2, init_kl_coef=0.3)
    scores = [1.0, 3.0, 2.0, -1.0]
    trainer.step(gen.queries, gen.responses, scores)
    batch = caught[0][0]
    # GRPO: A_i = (r_i - mean(group)) / (std(group) + 1e-6), std with Bessel's correction; the KL is in the loss
    # (kl_in_loss), so r_i is the score alone. Group of 2: std = |r_a - r_b| / sqrt(2).
    want = []
    for a, b in ((1.0, 3.0), (2.0, -1.0)):
        mean, std = (a + b) / 2, abs(a - b) / math.sqrt(2)
        want += [(a - mean) / (std + 1e-6), (b - mean) / (std + 1e-6)]  # (-0.7071, 0.7071, 0.7071, -0.7071)
    assert_rows(as_rows(batch.advantages, batch), [[w] * L for w, (L, _, _) in zip(want, rows(batch))])
    assert (batch.non_score == 0).all() and batch.returns is None


def test_rloo_advantages_with_the_kl_in_the_reward_by_hand(tmp_path, caught):
    beta = 0.5
    trainer, gen = make(tmp_path, prompts=GROUPED, algorithm="rloo", num_generations=2, init_kl_coef=beta)
    scores = [1.0, 3.0, 2.0, -1.0]
    trainer.step(gen.queries, gen.responses, scores)
    batch = caught[0][0]
    per_row = rows(batch)
    # RLOO: R_i = r_i - beta sum_t KL_it; A_i = R_i - mean of the other G - 1 completions' R (G = 2: R_i - R_j),
    # the same on every token of completion i; no whitening by default
    R = [s - beta * sum(kl) for s, (_, kl, _) in zip(scores, per_row)]
    want = [R[0] - R[1], R[1] - R[0], R[2] - R[3], R[3] - R[2]]
    assert max(abs(R[i] - scores[i]) for i in range(4)) > 1e-3  # the KL really enters
    assert_rows(as_rows(batch.advantages, batch), [[w] * L for w, (L, _, _) in zip(want, per_row)])


def test_reinforce_pp_grouped_baseline_and_discounted_returns_by_hand(tmp_path, caught):
    beta, gamma = 0.5, 0.9
    trainer, gen = make(tmp_path, prompts=GROUPED, algorithm="reinforce++", num_generations=2, init_kl_coef=beta,
                        gamma=gamma)
    scores = [1.0, 3.0, 2.0, -1.0]
    trainer.step(gen.queries, gen.responses, scores)
    batch = caught[0][0]
    per_row = rows(batch)
    # baseline: s_i - mean(its group) = (-1, 1, 1.5, -1.5); R_t = -beta KL_t, + that at the last token;
    # G_t = sum_{k >= t} gamma^(k - t) R_k; then whitened over every token (whiten_advantages, its default)
    centred = [-1.0, 1.0, 1.5, -1.5]
    returns = []
    for (L, kl, _), s in zip(per_row, centred):
        r = [-beta * k for k in kl]
        r[L - 1] += s
        returns.append([sum(gamma ** (k - t) * r[k] for k in range(t, L)) for t in range(L)])
    assert any(L > 1 for L, _, _ in per_row)  # gamma acts only on completions longer than one token
    assert_rows(as_rows(batch.advantages, batch), whiten(returns))
    assert batch.returns is None


# ---- the critic ---------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_separate_critic_is_clipped_apart_from_the_policy(tmp_path, caught):
    """max_grad_norm c: each group g (policy, critic) is scaled by min(1, c / (|g| + 1e-6)) on its own."""
    c = 0.05
    trainer, gen = make(tmp_path, critic="policy", max_grad_norm=c)
    groups = trainer.learner.clip_groups
    assert len(groups) == 2
    raw = {}
    for p in groups[0] + groups[1]:
        p.register_hook(lambda g, p=p: raw.__setitem__(p, g.clone()))  # before clipping (one backward)
    stepped = {}
    real_step = trainer.optimizer.step

    def step_spy(*args, **kwargs):
        stepped.update({p: p.grad.clone() for p in groups[0] + groups[1]})
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step_spy
    stats = trainer.step(gen.queries, gen.responses, [1.0, -0.5, 2.0, 0.0])
    norms = [math.sqrt(sum(raw[p].double().pow(2).sum().item() for p in g)) for g in groups]
    assert stats["ppo/grad_norm"] == pytest.approx(norms[0], rel=1e-5)
    assert stats["ppo/critic_grad_norm"] == pytest.approx(norms[1], rel=1e-5)
    assert min(norms) > 2 * c and max(norms) > 2 * min(norms)  # both clipped, by different factors
    for g, norm in zip(groups, norms):
        for p in g:
            torch.testing.assert_close(stepped[p], raw[p] * (c / (norm + 1e-6)), atol=1e-7, rtol=1e-5)


def test_shared_value_head_reads_the_state_before_each_token(tmp_path):
    """V(s_t) for response token t is the head on the last hidden state at the position that predicts token t
    (prompt end for t = 0), as the logits are; left padding does not move it."""
    trainer, gen = make(tmp_path, value_seed=0)
    model, head = trainer.policy.model, trainer.policy.value_head
    batch = trainer.score(gen.queries, gen.responses)
    with torch.no_grad():
        _, values = trainer.trainable(batch.query_ids, batch.query_mask, batch.response_ids)
        for i, (q, r) in enumerate(zip(gen.queries, gen.responses)):
            ids = torch.cat([q, r])[None]  # this row alone, unpadded
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            want = head(hidden[len(q) - 1:len(q) - 1 + len(r)]).squeeze(-1)
            torch.testing.assert_close(values[i, :len(r)], want, atol=1e-5, rtol=0)
    assert len({len(q) for q in gen.queries}) > 1  # rows with left padding among them
