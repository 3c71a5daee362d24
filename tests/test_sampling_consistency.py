"""The FAQ's negative-KL bug class, closed: samples are scored under the distribution that drew them."""

import copy

import pytest
import torch
from conftest import make_model, make_tokenizer

from tether import PPOConfig
from tether.models.policy import response_forward
from tether.ops import ESTIMATORS, gather_logprobs
from tether.rollout import Sampler, sample
from tether.trainers.batching import left_pad
from tether.trainers import PPOTrainer
from transformers.generation import logits_process as lp

PROMPTS = ["the movie was", "i", "a very long plot and the actor was", "fun", "we really", "it is not quite"]
SETTINGS = dict(top_k=5, top_p=0.8, min_new_tokens=8)


def reference_and_policy(vocab_size: int):
    """Untied GPT-2 pair. The reference is made peaked (logits x6); the policy is the same network with
    flatter logits (x0.4 of that): on its top tokens it puts *less* mass than the reference, which is
    exactly the FAQ's top-k exploit ("smooth out the distribution")."""
    ref = make_model(vocab_size, seed=1)
    ref.config.tie_word_embeddings = False
    ref.lm_head.weight = torch.nn.Parameter(ref.transformer.wte.weight.detach().clone() * 6.0)
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        policy.lm_head.weight.mul_(0.4)
    return ref, policy


def encode(tokenizer, prompts):
    ids, mask = left_pad([torch.tensor(tokenizer(p)["input_ids"]) for p in prompts], tokenizer.pad_token_id)
    assert len(set(mask.sum(1).tolist())) > 1, "prompts must have different lengths to exercise left padding"
    return ids, mask


def replayed_logprobs(model, sampler, q_ids, q_mask, r_ids):
    logits, _ = response_forward(model, q_ids, q_mask, r_ids)
    full = torch.cat([q_mask, torch.ones_like(r_ids)], 1)
    return gather_logprobs(sampler.sequence_scores(logits, torch.cat([q_ids, r_ids], 1), full), r_ids)


def test_replay_matches_transformers_generate_processed_scores():
    """Independent reference: transformers' own generate(), its processed scores (output_scores)."""
    tok = make_tokenizer()
    _, policy = reference_and_policy(len(tok))
    q_ids, q_mask = encode(tok, PROMPTS)
    torch.manual_seed(0)
    out = policy.generate(input_ids=q_ids, attention_mask=q_mask, do_sample=True, max_new_tokens=12,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, output_scores=True,
                          return_dict_in_generate=True, **SETTINGS)
    r_ids = out.sequences[:, q_ids.shape[1]:]
    hf = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1).gather(-1, r_ids[..., None])[..., 0]
    sampler = Sampler([tok.eos_token_id], **SETTINGS)
    ours = replayed_logprobs(policy, sampler, q_ids, q_mask, r_ids)
    from tether.ops import response_mask
    mask = response_mask(r_ids, [tok.eos_token_id]).bool()
    assert torch.isfinite(hf[mask]).all()
    torch.testing.assert_close(ours[mask], hf[mask], atol=1e-5, rtol=0)
    # min_new_tokens really acted: no EOS in the first 8 tokens, and EOS had probability 0 there
    assert not (r_ids[:, :8] == tok.eos_token_id).any()
    assert torch.isinf(torch.stack(out.scores[:8], 1)[..., tok.eos_token_id]).all()


def test_replay_matches_tethers_own_sampler_probabilities():
    tok = make_tokenizer()
    _, policy = reference_and_policy(len(tok))
    q_ids, q_mask = encode(tok, PROMPTS)
    sampler = Sampler([tok.eos_token_id], repetition_penalty=1.3, no_repeat_ngram_size=3, **SETTINGS)
    roll = sample(policy, sampler, q_ids, q_mask, 14, tok.pad_token_id, torch.Generator().manual_seed(0))
    ours = replayed_logprobs(policy, sampler, q_ids, q_mask, roll.response_ids)
    m = roll.response_mask.bool()
    torch.testing.assert_close(ours[m], roll.sample_logprobs[m], atol=1e-5, rtol=0)


def kl_per_sequence(policy, ref, tok, batches: int, naive: bool) -> torch.Tensor:
    sampler = Sampler([tok.eos_token_id], **SETTINGS)
    q_ids, q_mask = encode(tok, PROMPTS * 3)
    gen = torch.Generator().manual_seed(123)
    totals = []
    for _ in range(batches):
        roll = sample(policy, sampler, q_ids, q_mask, 12, tok.pad_token_id, gen)
        r = roll.response_ids
        if naive:  # what a sampler-unaware trainer computes: raw logits for both models
            logp = gather_logprobs(response_forward(policy, q_ids, q_mask, r)[0], r)
        else:
            logp = replayed_logprobs(policy, sampler, q_ids, q_mask, r)
        ref_logp = gather_logprobs(sampler.reference_scores(response_forward(ref, q_ids, q_mask, r)[0]), r)
        totals.append(torch.where(roll.response_mask.bool(), logp - ref_logp, 0.0).sum(-1))
    return torch.cat(totals)


@torch.no_grad()
def test_k1_kl_is_nonnegative_with_truncated_sampling_and_naive_scoring_is_not():
    tok = make_tokenizer()
    ref, policy = reference_and_policy(len(tok))
    tether_kl = kl_per_sequence(policy, ref, tok, batches=20, naive=False)
    naive_kl = kl_per_sequence(policy, ref, tok, batches=20, naive=True)
    se = lambda x: x.std() / len(x) ** 0.5  # noqa: E731
    assert tether_kl.mean() >= -3 * se(tether_kl), (tether_kl.mean(), se(tether_kl))
    # The same samples scored naively show the FAQ's negative KL, far beyond noise: the test can fail.
    assert naive_kl.mean() < -3 * se(naive_kl), (naive_kl.mean(), se(naive_kl))


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_kl_is_zero_when_policy_equals_reference_under_pure_sampling(estimator, tmp_path):
    tok = make_tokenizer()
    # at temperature 0.7: a reference scored at another temperature than the policy would not give 0
    cfg = PPOConfig(batch_size=6, minibatch_size=3, max_new_tokens=10, kl_estimator=estimator, temperature=0.7,
                    output_dir=str(tmp_path))
    trainer = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)
    gen = trainer.generate(PROMPTS)
    stats = trainer.step(gen.queries, gen.responses, [0.0] * 6)
    assert abs(stats["objective/kl"]) < 1e-5
    assert abs(stats["objective/kl_estimate"]) < 1e-5
    assert stats["tokens/response_len_mean"] > 1


def test_padding_after_eos_is_masked_out_of_everything(tmp_path):
    """Rows that finish early are padded; those positions carry no KL, value, advantage or loss."""
    tok = make_tokenizer()
    model = make_model(len(tok), seed=3)
    with torch.no_grad():  # make EOS likely so that rows finish at different lengths
        model.lm_head.weight[tok.eos_token_id] += 0.5 * model.transformer.wte.weight.std() * 40
    # top-k makes after-EOS padding score -inf under replay: masking must not turn that into nan
    cfg = PPOConfig(batch_size=6, minibatch_size=3, max_new_tokens=10, top_k=3, output_dir=str(tmp_path))
    trainer = PPOTrainer(cfg, model=model, tokenizer=tok)
    gen = trainer.generate(PROMPTS)
    lengths = [len(r) for r in gen.responses]
    assert min(lengths) < max(lengths), lengths
    for r in gen.responses:  # each response stops at its first EOS (or at max_new_tokens)
        eos_at = (r == tok.eos_token_id).nonzero()
        assert len(eos_at) == 0 or eos_at[0].item() == len(r) - 1
    batch = trainer.score(gen.queries, gen.responses)
    outside = batch.mask == 0
    assert outside.any()
    for t in (batch.logprobs, batch.ref_logprobs, batch.values, batch.kl, batch.entropy):
        assert (t[outside] == 0).all() and torch.isfinite(t).all()
    stats = trainer.step(gen.queries, gen.responses, [1.0] * 6)
    assert all(v == v for v in stats.values()), stats  # no nan anywhere


def test_warns_when_responses_were_sampled_under_other_settings(tmp_path):
    """The trainer samples purely; responses drawn elsewhere with top-k=5 make the k1 estimate negative."""
    tok = make_tokenizer()
    ref, policy = reference_and_policy(len(tok))
    cfg = PPOConfig(batch_size=18, minibatch_size=6, max_new_tokens=12, output_dir=str(tmp_path))
    trainer = PPOTrainer(cfg, model=policy, ref_model=ref, tokenizer=tok)
    q_ids, q_mask = encode(tok, PROMPTS * 3)
    elsewhere = Sampler([tok.eos_token_id], **SETTINGS)
    roll = sample(policy, elsewhere, q_ids, q_mask, 12, tok.pad_token_id, torch.Generator().manual_seed(0))
    queries = [q[m.bool()] for q, m in zip(q_ids, q_mask)]
    responses = [r[m.bool()] for r, m in zip(roll.response_ids, roll.response_mask)]
    batch = trainer.score(queries, responses)  # before the update
    with pytest.warns(UserWarning, match="objective/kl_estimate = .* < 0"):
        stats = trainer.step(queries, responses, [0.0] * 18)
    # the exact KL stays a true KL even then: what kl_full gives on the same batch, and clearly positive
    assert stats["objective/kl"] == pytest.approx(batch.kl_exact.sum(-1).mean().item(), abs=1e-6)
    assert stats["objective/kl"] > 0.1 > stats["objective/kl_estimate"]


def test_no_warning_for_own_samples(tmp_path, recwarn):
    tok = make_tokenizer()
    ref, policy = reference_and_policy(len(tok))
    cfg = PPOConfig(batch_size=18, minibatch_size=6, max_new_tokens=12, output_dir=str(tmp_path), **SETTINGS)
    trainer = PPOTrainer(cfg, model=policy, ref_model=ref, tokenizer=tok)
    gen = trainer.generate(PROMPTS * 3)
    trainer.step(gen.queries, gen.responses, [0.0] * 18)
    assert not [w for w in recwarn if "kl_estimate" in str(w.message)]


def test_draw_follows_the_distribution_and_never_picks_filtered_tokens():
    from tether.rollout.generate import draw

    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.0, 0.05])
    logprobs = probs.log().expand(20000, -1)  # -inf for the filtered tokens
    counts = torch.bincount(draw(logprobs, torch.Generator().manual_seed(0))[:, 0], minlength=6).double()
    assert counts[1] == 0 and counts[4] == 0
    expected = probs.double() * 20000
    keep = expected > 0
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    assert chi2 < 16.3, (counts, chi2)  # chi-square, 3 degrees of freedom, p = 0.001


# ---- repetition penalty and n-gram blocking against transformers' own processors -----------------
def _hf_row(processors, prefix, logits):
    """transformers' processors, in generate()'s order, on one row alone (no padding): prefix (n,), logits (V,)."""
    x = logits[None].clone()
    for p in processors:
        x = p(prefix[None], x)
    return x[0]


def test_repetition_penalty_and_ngram_blocking_match_transformers_on_a_left_padded_batch():
    """Each row of a left-padded batch, step by step and replayed, gets the scores transformers' processors give
    that row alone. transformers' RepetitionPenaltyLogitsProcessor itself, handed the padded batch, also penalises
    the pad token (left padding is "seen"); tether's does not: a row's distribution must not depend on how much
    padding its batch needed."""
    tok = make_tokenizer()
    _, policy = reference_and_policy(len(tok))
    q_ids, q_mask = encode(tok, PROMPTS)
    # a response that repeats words and bigrams, so that both processors act
    words = "the movie was the movie was good good the movie".split()
    r_ids = torch.tensor([tok.convert_tokens_to_ids(words)] * len(PROMPTS))
    penalty, n = 1.7, 2
    hf = [lp.RepetitionPenaltyLogitsProcessor(penalty), lp.NoRepeatNGramLogitsProcessor(n)]  # generate()'s order
    sampler = Sampler([tok.eos_token_id], repetition_penalty=penalty, no_repeat_ngram_size=n)
    with torch.no_grad():
        logits, _ = response_forward(policy, q_ids, q_mask, r_ids)
    ids = torch.cat([q_ids, r_ids], 1)
    full = torch.cat([q_mask, torch.ones_like(r_ids)], 1)
    replayed = sampler.sequence_scores(logits, ids, full)
    P, pad = q_ids.shape[1], tok.pad_token_id
    banned = 0
    for t in range(r_ids.shape[1]):
        stepped = sampler.step_scores(logits[:, t], ids[:, :P + t], full[:, :P + t], t)
        torch.testing.assert_close(replayed[:, t], stepped, atol=0, rtol=0)
        for i in range(len(PROMPTS)):
            prefix = ids[i, :P + t][full[i, :P + t].bool()]  # this row alone
            want = _hf_row(hf, prefix, logits[i, t])
            torch.testing.assert_close(stepped[i], want, atol=1e-6, rtol=0)
            banned += int(torch.isinf(want).sum())
            if not full[i, :P].all():  # padded row: transformers' processor on the padded batch penalises <pad>
                padded = hf[0](ids[i:i + 1, :P + t], logits[i:i + 1, t].clone())[0]
                assert padded[pad] != logits[i, t, pad] and stepped[i, pad] == logits[i, t, pad]
    assert banned > 0  # n-gram blocking really banned tokens
    assert (~full.bool()).any()


def test_a_user_logits_processor_is_sampled_with_and_replayed_end_to_end(tmp_path):
    """NoBadWordsLogitsProcessor passed to the trainer: generation never writes the banned words, and the
    behaviour log-probs the trainer scores equal those of transformers' processors (repetition penalty,
    n-gram blocking, the user's processor) applied to each row alone on its own forward pass."""
    tok = make_tokenizer()
    ids = tok.convert_tokens_to_ids
    banned = lp.NoBadWordsLogitsProcessor([[ids("awful")], [ids("very"), ids("bad")]], eos_token_id=tok.eos_token_id)
    cfg = PPOConfig(batch_size=6, minibatch_size=6, ppo_epochs=1, max_new_tokens=10, repetition_penalty=1.5,
                    no_repeat_ngram_size=2, output_dir=str(tmp_path))
    model = make_model(len(tok), seed=2)
    trainer = PPOTrainer(cfg, model=model, tokenizer=tok, logits_processors=[banned])
    gen = trainer.generate(PROMPTS)
    hf = [lp.RepetitionPenaltyLogitsProcessor(1.5), lp.NoRepeatNGramLogitsProcessor(2), banned]
    batch = trainer.score(gen.queries, gen.responses)
    for i, (q, r) in enumerate(zip(gen.queries, gen.responses)):
        text = torch.cat([q, r]).tolist()
        assert ids("awful") not in r.tolist()
        assert all((a, b) != (ids("very"), ids("bad")) for a, b in zip(text, text[1:]))
        bigrams = list(zip(text, text[1:]))[len(q) - 1:]  # those the response made
        assert len(bigrams) == len(set(bigrams)), text
        with torch.no_grad():
            logits = model(input_ids=torch.cat([q, r])[None]).logits[0, len(q) - 1:-1]
        want = [torch.log_softmax(_hf_row(hf, torch.cat([q, r[:t]]), logits[t]), -1)[r[t]] for t in range(len(r))]
        torch.testing.assert_close(batch.logprobs[i, :len(r)], torch.stack(want), atol=1e-5, rtol=0)
    assert not batch.flipped.any()
    stats = trainer.step(gen.queries, gen.responses, [float(i % 2) for i in range(6)])
    assert abs(stats["ppo/policy/ratio_mean"] - 1) < 1e-5  # first update: the replay equals the sampler


# ---- the support-flip fallback ---------------------------------------------------------------------
def _score_fixed(sampler, logits, responses):
    """score_rollouts on fixed logits (B, T, V) for one-token prompts: the policy's and the reference's alike."""
    from tether.models.head import over_positions
    from tether.ops.kl import ESTIMATORS
    from tether.trainers.scoring import score_rollouts

    B = len(responses)
    same = lambda x: x  # noqa: E731 (the logits are given: no head to apply)
    return score_rollouts(lambda q, m, r, per_token: (over_positions(per_token, logits, same, 1), None),
                          lambda q, m, r: (logits, same), sampler, ESTIMATORS["kl"], False,
                          [torch.tensor([3])] * B, [torch.tensor(r) for r in responses], 1, [0], B,
                          torch.device("cpu"))


def test_a_token_just_outside_top_k_or_top_p_by_round_off_is_scored_untruncated_and_flagged():
    """Vocabulary 5, EOS 0. top_k=2 at logits (0, 2, 1.5 - 1e-6, 1.5, -2): token 2 is third by 1e-6, as a cached
    vs teacher-forced forward can make a token that was second; top_p=0.5 at probabilities ~(0.2, 0.3, 0.5):
    the 0.3 token's ascending cumulative mass 0.5 - 1e-6 lies just under the cut 1 - top_p = 0.5. Both are
    scored log softmax(x)[a] = x_a - logsumexp(x), untruncated, and flagged."""
    x = torch.tensor([0.0, 2.0, 1.5 - 1e-6, 1.5, -2.0])
    logits = torch.stack([torch.tensor([0.0, 3.0, 1.0, 0.5, -1.0]), x])[None]  # (1, 2, 5): response [1, 2]
    batch = _score_fixed(Sampler([0], top_k=2), logits, [[1, 2]])
    assert batch.flipped.tolist() == [[False, True]]
    assert batch.logprobs[0, 1].item() == pytest.approx((x[2] - torch.logsumexp(x, 0)).item(), abs=1e-6)

    y = torch.tensor([1e-4, 0.2 - 1e-4, 0.3 - 1e-4 - 1e-6, 0.5 + 1e-6, 1e-4], dtype=torch.float64).log().float()
    cut = torch.softmax(y.sort().values, 0).cumsum(0)[3].item()  # ascending cumulative mass up to token 2 (~0.3)
    assert 0.5 - 1e-5 < cut <= 0.5
    batch = _score_fixed(Sampler([0], top_p=0.5), torch.stack([y, y])[None], [[3, 2]])
    assert batch.flipped.tolist() == [[False, True]]
    assert batch.logprobs[0, 1].item() == pytest.approx(y[2].item() - torch.logsumexp(y, 0).item(), abs=1e-6)


@pytest.mark.parametrize("settings, response, where", [
    ({"top_k": 2}, [4, 1], "response 0 token 0 \\(id 4\\)"),  # logit -1 against the kept 3 and 1: far outside
    ({"top_k": 2, "min_new_tokens": 2}, [1, 0], "response 0 token 1 \\(id 0\\)"),  # EOS banned at t < 2
])
def test_a_token_outside_the_support_beyond_round_off_is_refused_not_relabelled(settings, response, where):
    logits = torch.tensor([[0.0, 3.0, 1.0, 0.5, -1.0], [5.0, 3.0, 1.0, 0.5, -1.0]])[None]
    with pytest.raises(ValueError, match=where + " has probability 0 under the sampler"):
        _score_fixed(Sampler([0], **settings), logits, [response])


def test_step_refuses_responses_the_sampler_could_not_have_drawn(tmp_path):
    tok = make_tokenizer()
    cfg = PPOConfig(batch_size=2, minibatch_size=2, max_new_tokens=4, top_k=3, output_dir=str(tmp_path))
    trainer = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)
    gen = trainer.generate(PROMPTS[:2])
    with torch.no_grad():  # the least likely next token of row 1's prompt: far outside its top 3
        worst = trainer.policy.model(gen.queries[1][None]).logits[0, -1].argmin().item()
    responses = [gen.responses[0], torch.cat([torch.tensor([worst]), gen.responses[1]])[:4]]
    with pytest.raises(ValueError, match=f"response 1 token 0 \\(id {worst}\\) has probability 0 under the sampler"):
        trainer.step(gen.queries, responses, [0.0, 1.0])
    assert trainer.step_count == 0
    stats = trainer.step(gen.queries, gen.responses, [0.0, 1.0])  # its own samples are fine
    assert stats["rollout/support_flips"] == 0
