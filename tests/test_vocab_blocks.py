"""The vocabulary a block of positions at a time (models/head.py): the same numbers as the whole (B, T, V) logits.

Three ways to score and train the same rollouts: blocks of a few positions (each checkpointed, its logits
recomputed in the backward pass), one block of every position, and the model's own logits whole with no head
separated (what tether did before, and still does for a model that soft-caps its logits). Scoring results,
losses and gradients must agree to float round-off (1e-6, fp32) for every method and for the parts that change
what the per-token function computes: top-k / top-p (support flips), min_new_tokens and a repetition penalty
(replayed per position, so a block must know where it starts), the KL term and the entropy bonus with
gradients, LoRA (the reference is the policy with its adapters off, in the projection too), a separate critic.
"""

import pytest
import torch
from conftest import make_model, make_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tether import PPOConfig
from tether.models.head import over_positions, position_blocks, separable_head
from tether.ops import gather_logprobs
from tether.ops.logprobs import entropy_from_logits
from tether.trainers import trainer_class
from tether.trainers.optimise import micro_loss

PROMPTS = ["the movie was", "i really", "a story", "the actor and"]


@given(st.integers(1, 9), st.integers(1, 12), st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_blocks_tile_the_grid_once_and_stay_within_the_budget(batch, length, rows):
    seen = torch.zeros(batch, length, dtype=torch.long)
    for b, t in position_blocks(batch, length, rows):
        cells = (b.stop - b.start) * (t.stop - t.start)
        assert 1 <= cells <= max(rows, 1)
        seen[b, t] += 1
    assert torch.equal(seen, torch.ones_like(seen))


def _per_token(logits, b, t, tokens):
    return {"logprobs": gather_logprobs(logits, tokens[b, t]), "entropy": entropy_from_logits(logits)}


@pytest.mark.parametrize("rows", [1, 2, 5, 7, 1000])
def test_blocks_give_the_whole_logits_values_and_gradients(rows):
    """A linear head over random states: log-probs, entropies and the gradients of a loss of both, for the
    states and the head's weight, against the same functions on the whole (B, T, V) logits."""
    g = torch.Generator().manual_seed(0)
    states = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    head = nn.Linear(8, 50, bias=False)
    tokens = torch.randint(0, 50, (3, 5), generator=g)
    coef = torch.randn(2, 3, 5, generator=g)

    def loss_and_grads(out):
        loss = (coef[0] * out["logprobs"]).sum() + (coef[1] * out["entropy"]).sum()
        return loss, torch.autograd.grad(loss, [states, head.weight])

    whole = _per_token(head(states), slice(0, 3), slice(0, 5), tokens)
    blocked = over_positions(lambda x, b, t: _per_token(x, b, t, tokens), states, head, rows)
    for name in whole:
        torch.testing.assert_close(blocked[name], whole[name], atol=1e-6, rtol=1e-6)
    (loss_w, grads_w), (loss_b, grads_b) = loss_and_grads(whole), loss_and_grads(blocked)
    assert loss_b.item() == pytest.approx(loss_w.item(), abs=1e-5)
    for a, b in zip(grads_b, grads_w):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_a_head_that_soft_caps_its_logits_is_not_separated():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=1, hidden_size=16, intermediate_size=32, vocab_size=40,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8)).eval()
    assert gemma.config.final_logit_softcapping and separable_head(gemma) is None
    gpt2 = make_model(40)
    assert separable_head(gpt2) is gpt2.lm_head


# (name, config): every method, and the settings that change what the per-token function computes
CASES = {
    "ppo": {"algorithm": "ppo"},
    "ppo_topk_minnew_critic": {"algorithm": "ppo", "critic": "policy", "top_k": 6, "top_p": 0.9, "min_new_tokens": 3,
                               "repetition_penalty": 1.3, "temperature": 0.8},
    "grpo_kl_entropy_topk": {"algorithm": "grpo", "num_generations": 2, "kl_in_loss": True, "init_kl_coef": 0.3,
                             "entropy_coef": 0.05, "top_k": 5, "temperature": 0.7},
    "rloo": {"algorithm": "rloo", "num_generations": 2, "no_repeat_ngram_size": 2},
    "reinforce_pp_lora": {"algorithm": "reinforce++", "lora_r": 2, "kl_in_loss": True, "init_kl_coef": 0.2,
                          "top_p": 0.8},
}


def _trainer(tmp_path, case, name, rows, whole_logits=False):
    tok = make_tokenizer()
    cfg = PPOConfig(**{"batch_size": 4, "minibatch_size": 4, "ppo_epochs": 1, "max_new_tokens": 7, "seed": 0,
                       "device": "cpu", "learning_rate": 1e-2, "logits_chunk_rows": rows,
                       "output_dir": str(tmp_path / name), **CASES[case]})
    trainer = trainer_class(cfg.algorithm)(cfg, model=make_model(len(tok)), tokenizer=tok)
    if whole_logits:  # the model's own (B, T, V) logits, as for a model whose head is not separable
        trainer.policy.head = None
        trainer.ref_head = None
    return trainer


def _score_and_grads(trainer, gen):
    batch = trainer.score(gen.queries, gen.responses)
    g = torch.Generator().manual_seed(1)
    batch = batch.__class__(**{**batch.__dict__, "advantages": torch.randn(batch.mask.shape, generator=g),
                               "returns": torch.randn(batch.mask.shape, generator=g) if batch.values is not None
                               else None})
    weights = trainer.learner.aggregate(batch.train_mask, lambda x: x)
    stat_weights = batch.train_mask / batch.train_mask.sum()
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, _ = micro_loss(trainer.learner, batch, 0.3, weights, stat_weights)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.trainable.named_parameters() if p.grad is not None}
    return batch, loss.item(), grads


@pytest.mark.parametrize("case", sorted(CASES))
def test_scoring_loss_and_gradients_do_not_depend_on_the_blocks(tmp_path, case):
    """Blocks of 3 positions (several per batch row, checkpointed), one block of all 28, and the whole logits
    without a separated head: the same samples, scores, loss and gradient of every trained parameter."""
    runs = {}
    for name, rows, whole in (("blocks_of_3", 3, False), ("one_block", 10_000, False), ("whole_logits", 3, True)):
        trainer = _trainer(tmp_path, case, name, rows, whole)
        assert trainer.policy.block_rows == rows
        gen = trainer.generate(PROMPTS if trainer.config.num_generations == 1 else [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2)
        runs[name] = (gen, *_score_and_grads(trainer, gen))
    (gen_a, batch_a, loss_a, grads_a) = runs["whole_logits"]
    assert sum(len(r) for r in gen_a.responses) >= 12  # several blocks per row
    for name in ("blocks_of_3", "one_block"):
        gen, batch, loss, grads = runs[name]
        assert [r.tolist() for r in gen.responses] == [r.tolist() for r in gen_a.responses]
        for field in ("logprobs", "ref_logprobs", "kl", "kl_exact", "entropy", "values"):
            a, b = getattr(batch_a, field), getattr(batch, field)
            if a is not None:
                torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=f"{name} {field}")
        assert torch.equal(batch.flipped, batch_a.flipped)
        assert loss == pytest.approx(loss_a, abs=1e-6)
        assert grads.keys() == grads_a.keys() and grads
        for key in grads:
            torch.testing.assert_close(grads[key], grads_a[key], atol=1e-6, rtol=1e-5, msg=f"{name} {key}")


def test_a_whole_step_is_the_same_in_blocks(tmp_path):
    """End to end through step(): metrics and updated weights, blocks of 2 positions against one block."""
    out = []
    for name, rows in (("small", 2), ("large", 10_000)):
        trainer = _trainer(tmp_path, "grpo_kl_entropy_topk", name, rows)
        gen = trainer.generate([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2)
        stats = trainer.step(gen.queries, gen.responses, [0.0, 1.0, 2.0, 0.5])
        out.append((stats, [p.detach().clone() for p in trainer.trainable.parameters()]))
    (s_small, p_small), (s_large, p_large) = out
    for key in ("objective/kl", "objective/entropy", "ppo/loss/policy", "ppo/loss/kl", "ppo/loss/entropy",
                "ppo/policy/ratio_mean", "ppo/grad_norm"):
        assert s_small[key] == pytest.approx(s_large[key], abs=1e-6, rel=1e-5), key
    for a, b in zip(p_small, p_large):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_zero3_takes_one_block_per_micro_batch_and_refuses_explicit_blocks():
    """Under ZeRO-3 each LM-head call gathers the head from every process, so all must make the same calls; the
    number of blocks follows each process's own micro-batch shapes."""
    from types import SimpleNamespace

    from tether.trainers.assemble import logits_block_rows

    zero3, ddp = SimpleNamespace(zero_stage=3), SimpleNamespace(zero_stage=0)
    assert logits_block_rows(PPOConfig(logits_chunk_rows=3), ddp) == 3
    assert logits_block_rows(PPOConfig(), zero3) >= 1 << 40
    with pytest.raises(ValueError, match="logits_chunk_rows=3 under DeepSpeed ZeRO-3 is not supported"):
        logits_block_rows(PPOConfig(logits_chunk_rows=3), zero3)
