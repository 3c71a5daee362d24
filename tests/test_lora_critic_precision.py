"""LoRA policy with its own adapters-off reference, a separate critic, gradient checkpointing, bf16."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer
from test_ppo_learns import PROMPTS, share_of
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from tether import PPOConfig
from tether.models.attention import FP32_SDPA, fp32_sdpa_attention
from tether.models.policy import response_forward
from tether.trainers import GRPOTrainer, PPOTrainer
from tether.trainers.scoring import reference_states

# Only the LoRA tests need PEFT (the `peft` extra); the critic and precision tests run without it.
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="LoRA needs peft: pip install tether[peft]")


def _gen_and_step(trainer, scores=None):
    gen = trainer.generate(PROMPTS[:trainer.config.batch_size])
    scores = scores or [float(i % 3) for i in range(trainer.config.batch_size)]
    return gen, trainer.step(gen.queries, gen.responses, scores)


# ---- LoRA ----------------------------------------------------------------------------------------
@needs_peft
def test_lora_reference_is_the_base_model_with_no_second_copy(tmp_path):
    tok = make_tokenizer()
    base = make_model(len(tok))
    frozen_copy = make_model(len(tok))  # same seed: the weights the reference must keep
    cfg = PPOConfig(batch_size=4, minibatch_size=4, max_new_tokens=6, learning_rate=1e-2, lora_r=4,
                    output_dir=str(tmp_path))
    trainer = PPOTrainer(cfg, model=base, tokenizer=tok)
    assert trainer.ref is None
    n_base = sum(p.numel() for p in frozen_copy.parameters())
    n_all = sum(p.numel() for p in trainer.trainable.parameters())
    n_lora = sum(p.numel() for n, p in trainer.trainable.named_parameters() if "lora_" in n)
    assert n_all == n_base + n_lora + 33  # + value head (32 + 1): no reference copy anywhere
    trainable = {n for n, p in trainer.trainable.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "value_head" in n for n in trainable)

    for _ in range(3):
        gen, stats = _gen_and_step(trainer)
    assert stats["objective/kl"] > 0  # the policy moved away ...
    q = gen.queries[0][None]
    r = gen.responses[0][None]
    states, project = reference_states(trainer.policy.model, trainer.ref_head, trainer.peft, q, torch.ones_like(q), r)
    ref_logits = project(states)
    expected, _ = response_forward(frozen_copy, q, torch.ones_like(q), r)
    torch.testing.assert_close(ref_logits, expected, atol=1e-5, rtol=0)  # ... the reference did not
    policy_logits, _ = response_forward(trainer.policy.model, q, torch.ones_like(q), r)
    assert (policy_logits - expected).abs().max() > 1e-3


@needs_peft
def test_lora_policy_saves_merged_weights_that_transformers_loads(tmp_path):
    tok = make_tokenizer()
    cfg = PPOConfig(batch_size=4, minibatch_size=4, max_new_tokens=6, learning_rate=1e-2, lora_r=4,
                    output_dir=str(tmp_path / "run"))
    trainer = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)
    gen, _ = _gen_and_step(trainer)
    trainer.save(tmp_path / "policy")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    q, r = gen.queries[0][None], gen.responses[0][None]
    with torch.no_grad():
        expected, _ = response_forward(trainer.policy.model, q, torch.ones_like(q), r)
        got, _ = response_forward(loaded, q, torch.ones_like(q), r)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (tmp_path / "policy" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "policy" / "value_head.safetensors").exists()


def test_lora_with_ref_model_is_refused(tmp_path):
    tok = make_tokenizer()
    cfg = PPOConfig(lora_r=4, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="reference is the policy with its adapters disabled"):
        PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, ref_model=make_model(len(tok)))


@needs_peft
def test_lora_bad_target_modules_is_a_clear_error(tmp_path):
    tok = make_tokenizer()
    cfg = PPOConfig(lora_r=4, lora_target_modules=["no_such_layer"], output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"lora_target_modules=\['no_such_layer'\]"):
        PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)


@needs_peft
def test_lora_resumes_from_its_checkpoint(tmp_path):
    """2 steps, stop, resume for a 3rd: the same metrics and adapter weights as 3 steps straight. The reward (the
    completion's length in characters) differs between completions, so every step moves the weights; a resume that
    restored the adapters, the optimiser or the data order wrongly would show in step 3."""
    tok = make_tokenizer()

    def words(prompts, completions):
        return [len(c) / 10 for c in completions]

    def run(steps, resume, out):
        cfg = PPOConfig(steps=steps, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=4, lora_r=2,
                        learning_rate=1e-2, checkpoint_every=1, resume=resume, output_dir=str(tmp_path / out))
        trainer = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=PROMPTS, reward=words)
        return trainer, trainer.train()

    def lora_weights(trainer):
        return {n: p.detach().clone() for n, p in trainer.trainable.named_parameters() if p.requires_grad}

    first, _ = run(2, False, "run")
    after_two = lora_weights(first)
    resumed, history = run(3, True, "run")
    assert len(history) == 1
    straight, expected = run(3, False, "straight")
    assert all(h["ppo/grad_norm"] > 1e-3 and h["env/reward_std"] > 0 for h in expected)
    assert expected[-1]["objective/kl"] > 1e-4  # the adapters moved the policy off its reference
    got, want = history[0], expected[-1]
    assert got.keys() == want.keys()
    for key in want:
        if not key.startswith(("time/", "throughput/")):
            assert got[key] == pytest.approx(want[key], abs=1e-6, nan_ok=True), key
    final = lora_weights(straight)
    assert final.keys() == lora_weights(resumed).keys()
    for name, w in lora_weights(resumed).items():
        torch.testing.assert_close(w, final[name], atol=1e-6, rtol=0, msg=name)
    assert max((final[n] - after_two[n]).abs().max().item() for n in final) > 1e-4  # step 3 itself moved them


# ---- separate critic -------------------------------------------------------------------------------
def test_critic_from_the_policy_is_a_separate_copy(tmp_path):
    tok = make_tokenizer()
    cfg = PPOConfig(batch_size=4, minibatch_size=4, max_new_tokens=6, learning_rate=1e-2, critic="policy",
                    output_dir=str(tmp_path))
    trainer = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)
    assert trainer.policy.value_head is None and trainer.critic is not None
    policy_ids = {id(p) for p in trainer.policy.parameters()}
    assert not policy_ids & {id(p) for p in trainer.critic.parameters()}
    body_before = [p.detach().clone() for p in trainer.critic.body.parameters()]
    _, stats = _gen_and_step(trainer)
    assert "ppo/critic_grad_norm" in stats and "ppo/loss/value" in stats
    assert any(not torch.equal(a, b) for a, b in zip(body_before, trainer.critic.body.parameters()))
    trainer.save(tmp_path / "out")
    assert (tmp_path / "out" / "critic" / "value_head.safetensors").exists()
    assert not (tmp_path / "out" / "value_head.safetensors").exists()


def _tiny_llama_reward(tmp_path, tok, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, num_labels=1,
                         pad_token_id=tok.pad_token_id, eos_token_id=0, bos_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    folder = tmp_path / "reward"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, folder, config


def test_critic_from_a_reward_model_values_each_prefix_as_the_reward_model_scores_it(tmp_path):
    tok = make_tokenizer()
    reward_model, folder, config = _tiny_llama_reward(tmp_path, tok)
    policy = LlamaForCausalLM(config).eval()
    cfg = PPOConfig(batch_size=4, minibatch_size=4, max_new_tokens=6, critic=str(folder), output_dir=str(tmp_path))
    trainer = PPOTrainer(cfg, model=policy, tokenizer=tok)
    q = torch.tensor([[3, 4, 5]])
    r = torch.tensor([[6, 7, 8, 9]])
    with torch.no_grad():
        values = trainer.critic(q, torch.ones_like(q), r)
        for t in range(4):  # V(s_t) reads the prefix up to the token before response token t
            prefix = torch.cat([q, r[:, :t]], 1)
            expected = reward_model(input_ids=prefix, attention_mask=torch.ones_like(prefix)).logits[0, 0]
            assert abs(values[0, t].item() - expected.item()) < 1e-5


def test_critic_from_a_reward_model_with_another_tokenizer_is_refused(tmp_path):
    tok = make_tokenizer()
    _, folder, config = _tiny_llama_reward(tmp_path, tok)
    other = make_tokenizer(pad=False)
    other.save_pretrained(folder)
    cfg = PPOConfig(critic=str(folder), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="different tokenizer than the policy"):
        PPOTrainer(cfg, model=LlamaForCausalLM(config).eval(), tokenizer=tok)


def test_critic_from_an_encoder_reward_model_is_refused(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    tok = make_tokenizer()
    bert = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=1))
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    cfg = PPOConfig(critic=str(tmp_path / "bert"), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="is a bert model whose state at token t sees later tokens"):
        PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)


def test_ppo_with_a_separate_critic_learns(tmp_path):
    tok = make_tokenizer()
    target = tok.convert_tokens_to_ids("good")
    cfg = PPOConfig(steps=30, batch_size=16, minibatch_size=8, ppo_epochs=4, learning_rate=3e-3, max_new_tokens=8,
                    critic="policy", seed=0, output_dir=str(tmp_path))
    history = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=PROMPTS,
                         reward=share_of(target, tok)).train()
    rewards = [h["env/reward_mean"] for h in history]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.25, rewards
    assert max(h["objective/kl"] for h in history) <= 10 and history[-1]["objective/kl"] > 0  # exact: >= 0 anyway


# ---- gradient checkpointing and bf16 ------------------------------------------------------------------
@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_update(make, tmp_path):
    tok = make_tokenizer()

    def model():
        if make == "gpt2":
            return make_model(len(tok))
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                            max_position_embeddings=64)).eval()

    weights, calls = {}, {}
    for checkpointing in (False, True):
        cfg = PPOConfig(batch_size=4, minibatch_size=4, ppo_epochs=1, max_new_tokens=6, learning_rate=1e-2,
                        gradient_checkpointing=checkpointing, output_dir=str(tmp_path / str(checkpointing)))
        trainer = PPOTrainer(cfg, model=model(), tokenizer=tok)
        gen = trainer.generate(PROMPTS[:4])
        layer = trainer.policy.model.base_model.layers[0] if make == "llama" else trainer.policy.model.transformer.h[0]
        count = [0]  # counted on a child: transformers re-runs the layer's forward, not its __call__ hooks
        layer.mlp.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        trainer.step(gen.queries, gen.responses, [0.0, 1.0, 2.0, 0.5])
        calls[checkpointing] = count[0]
        weights[checkpointing] = [p.detach().clone() for p in trainer.policy.parameters()]
    # the policy's scoring forward + its update forward; checkpointing adds one recompute in backward
    assert calls[True] == calls[False] + 1, calls
    for a, b in zip(weights[False], weights[True]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_runs_forwards_in_bf16_and_log_probs_in_fp32(tmp_path):
    tok = make_tokenizer()
    cfg = PPOConfig(algorithm="grpo", batch_size=4, num_generations=2, minibatch_size=4, max_new_tokens=6,
                    precision="bf16", output_dir=str(tmp_path))
    trainer = GRPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)
    dtypes = []
    trainer.policy.model.lm_head.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    gen = trainer.generate(["the movie was"] * 2 + ["i really"] * 2)
    stats = trainer.step(gen.queries, gen.responses, [0.0, 1.0, 1.0, 0.0])
    assert set(dtypes) == {torch.bfloat16}
    assert stats["objective/kl"] == 0.0  # policy and reference (its linears stored in bf16) agree bit for bit
    # attention itself in fp32 on the CPU (the bf16 CPU kernels are slower), the same in policy and reference
    assert trainer.policy.model.config._attn_implementation == FP32_SDPA == trainer.ref.config._attn_implementation
    assert next(trainer.policy.parameters()).dtype == torch.float32  # weights and AdamW stay fp32
    assert all(v == v for v in stats.values())  # no nan
    assert abs(stats["ppo/policy/ratio_mean"] - 1) < 1e-3  # the replay is consistent in bf16 too
    # the log-probs are taken in fp32 from the bf16 logits: exactly the fp32 log-softmax, not a bf16 one
    batch = trainer.score(gen.queries, gen.responses)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = response_forward(trainer.policy.model, batch.query_ids, batch.query_mask, batch.response_ids)
    m = batch.mask.bool()
    pick = lambda lp: lp.gather(-1, batch.response_ids[..., None])[..., 0][m]  # noqa: E731
    assert batch.logprobs.dtype == torch.float32
    torch.testing.assert_close(batch.logprobs[m], pick(torch.log_softmax(logits.double(), -1)).float(), atol=1e-5,
                               rtol=0)
    in_bf16 = pick(torch.log_softmax(logits.bfloat16(), -1).float())
    assert (in_bf16 - batch.logprobs[m]).abs().max() > 1e-3  # a bf16 log-softmax would be visibly different


def test_precision_auto_is_fp32_on_cpu(tmp_path):
    tok = make_tokenizer()
    trainer = PPOTrainer(PPOConfig(device="cpu", output_dir=str(tmp_path)), model=make_model(len(tok)), tokenizer=tok)
    assert trainer.autocast_dtype is None


def test_fp32_attention_matches_sdpa_and_runs_in_fp32_under_bf16_inputs():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 1
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    expected, _ = sdpa_attention_forward(module, q, k, v, None)
    out, _ = fp32_sdpa_attention(module, q, k, v, None)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)  # fp32 in: exactly sdpa
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in the model: autocast would make sdpa bf16 again
        out, _ = fp32_sdpa_attention(module, qb, kb, vb, None)
    assert out.dtype == torch.bfloat16
    # computed from the bf16 values in fp32, rounded once at the end
    reference, _ = sdpa_attention_forward(module, qb.float(), kb.float(), vb.float(), None)
    torch.testing.assert_close(out, reference.bfloat16(), atol=0, rtol=0)


# ---- reusing freed memory on the CPU ------------------------------------------------------------------
def _resident_mb() -> float:
    import os
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc")
def test_keep_freed_memory_keeps_a_freed_large_block_for_reuse_and_the_default_returns_it(tmp_path, monkeypatch):
    import platform

    from tether.trainers import base, setup

    if platform.libc_ver()[0] != "glibc":
        assert setup.keep_freed_memory() is False and setup.return_large_buffers() is False
        return
    applied = []
    monkeypatch.setattr(base, "keep_freed_memory", lambda: applied.append("keep"))
    monkeypatch.setattr(base, "return_large_buffers", lambda: applied.append("return"))
    tok = make_tokenizer()
    PPOTrainer(PPOConfig(device="cpu", output_dir=str(tmp_path / "off")), model=make_model(len(tok)), tokenizer=tok)
    assert applied == ["return"]  # the default
    PPOTrainer(PPOConfig(device="cpu", keep_freed_memory=True, output_dir=str(tmp_path / "on")),
               model=make_model(len(tok)), tokenizer=tok)
    assert applied == ["return", "keep"]

    # each in a fresh process: what glibc does with a freed block depends on what the process freed before
    probe = ("import sys, torch; from tether.trainers import setup\n"
             "assert getattr(setup, sys.argv[1])() is True\n"
             "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
             "block = torch.ones(24 * 2**20 // 4); before = rss(); del block; print(before - rss())")
    freed = {name: float(subprocess.run([sys.executable, "-c", probe, name], capture_output=True, text=True,
                                        check=True).stdout) for name in ("keep_freed_memory", "return_large_buffers")}
    assert freed["keep_freed_memory"] < 8  # 24 MB (under glibc's own 32 MB ceiling) kept: the resident size stays
    assert freed["return_large_buffers"] > 16  # above the fixed 4 MiB threshold: mapped alone, unmapped on free


@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_reference_linears_stored_in_bf16_give_the_same_logits_under_autocast(make):
    from tether.models.policy import frozen_reference, linear_weights_in

    tok = make_tokenizer()
    if make == "gpt2":
        model = make_model(len(tok))
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=64, tie_word_embeddings=False)).eval()
    ref = frozen_reference(model)
    q, m, r = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[8, 9, 10, 11]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = response_forward(ref, q, m, r)[0]
        converted = linear_weights_in(ref, torch.bfloat16)
        after = response_forward(ref, q, m, r)[0]
    assert torch.equal(before, after)  # bit for bit: autocast cast these weights to bf16 anyway
    dtypes = {n: p.dtype for n, p in ref.named_parameters()}
    embedding = "transformer.wte.weight" if make == "gpt2" else "model.embed_tokens.weight"
    assert dtypes[embedding] == torch.float32  # GPT-2's tied LM head is the embedding: kept
    assert converted == sum(p.numel() for n, p in ref.named_parameters() if dtypes[n] == torch.bfloat16) > 0
    if make == "llama":  # the untied LM head is a linear layer like the others
        assert dtypes["lm_head.weight"] == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the policy itself is untouched


def test_fp32_attention_leaves_alone_a_model_whose_outputs_it_would_change():
    """Some modelling code takes another path unless the attention is named "sdpa" (Gemma 4's layers that share
    keys and values do in transformers 5.20 and later; 5.16-5.19, which the vllm extra pins, do not): the probe
    forward sees the difference and the model keeps sdpa. A Llama made to depend on the name stands in for such
    code on every transformers version."""
    from tether.models.attention import fp32_attention_on_cpu

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1)).eval()

    named = llama()
    named.model.norm.register_forward_hook(
        lambda m, i, out: out if named.config._attn_implementation == "sdpa" else out + 1)
    assert fp32_attention_on_cpu(named) is False and named.config._attn_implementation == "sdpa"
    plain = llama()
    assert fp32_attention_on_cpu(plain) is True and plain.config._attn_implementation == FP32_SDPA

    import transformers

    if hasattr(transformers, "Gemma4TextConfig") and _gemma4_shares_kv_by_name():
        cfg = transformers.Gemma4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            num_kv_shared_layers=2,
                                            layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=4)
        torch.manual_seed(0)
        gemma = transformers.Gemma4ForCausalLM(cfg).eval()
        assert fp32_attention_on_cpu(gemma) is False and gemma.config._attn_implementation == "sdpa"


def _gemma4_shares_kv_by_name() -> bool:
    """Whether this transformers' Gemma 4 picks its shared key/value path by the attention's name (5.20 on)."""
    import inspect

    import transformers.models.gemma4.modeling_gemma4 as gemma4

    return '"sdpa"' in inspect.getsource(gemma4)


def test_reference_linears_stay_as_they_are_when_bf16_storage_would_change_the_outputs():
    from tether.models.policy import frozen_reference, linear_weights_in

    tok = make_tokenizer()
    ref = frozen_reference(make_model(len(tok)))
    fc = ref.transformer.h[0].mlp.c_fc
    # modelling code that reads a linear weight outside an autocast-cast op sees its bf16 rounding
    # (here through the low bits of one weight, which bf16 storage rounds away)
    fc.register_forward_hook(lambda m, i, out: out + (m.weight[0, 0].double() * 2**16).frac().float())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = ref(input_ids=ids).logits
        assert linear_weights_in(ref, torch.bfloat16) == 0
        assert torch.equal(ref(input_ids=ids).logits, before)
    assert all(p.dtype == torch.float32 for p in ref.parameters())
