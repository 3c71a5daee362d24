"""Gradient checkpointing must never change what a model computes: the layers are recomputed in backward with
every module left in eval mode, so dropout stays off also in models whose layers apply it on their own
`self.training` (OPT ships dropout 0.1), and the gradients are those without checkpointing."""

import copy

import pytest
import torch
from conftest import make_tokenizer
from test_ppo_learns import PROMPTS
from transformers import OPTConfig, OPTForCausalLM, PretrainedConfig, PreTrainedModel

from tether import PPOConfig
from tether.models.policy import enable_gradient_checkpointing
from tether.trainers import PPOTrainer


def make_opt(vocab_size: int, seed: int = 0) -> OPTForCausalLM:
    """A tiny random OPT with OPT's own dropout (0.1 in every released checkpoint), in eval mode."""
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1,
                       bos_token_id=0, eos_token_id=0, pad_token_id=2)
    return OPTForCausalLM(config).eval()


def _inputs(vocab_size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab_size, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row, as tether batches prompts
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
            "use_cache": False}


def _loss(model, inputs) -> torch.Tensor:
    return model(**inputs).logits.float().log_softmax(-1)[..., 5].sum()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _fc1_calls(model) -> list[int]:
    """Counts the forwards of a child of each decoder layer (a recompute re-runs the layer's children)."""
    count = [0]
    for m in model.modules():
        if type(m).__name__ == "OPTDecoderLayer":
            m.fc1.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def _saved_bytes(model, inputs) -> int:
    """Bytes autograd keeps for backward in one forward (checkpointed layers keep theirs out of this graph)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, inputs)
    return total[0]


def test_checkpointed_opt_computes_what_it_computes_without():
    tok = make_tokenizer()
    plain, checkpointed = make_opt(len(tok)), make_opt(len(tok))
    enable_gradient_checkpointing(checkpointed)
    assert not any(m.training for m in checkpointed.modules())  # nothing put in training mode
    inputs = _inputs(len(tok))
    with torch.no_grad():
        expected = plain(**inputs).logits
        first, second = checkpointed(**inputs).logits, checkpointed(**inputs).logits
    assert torch.equal(first, second)
    assert torch.equal(first, expected)
    with torch.enable_grad():  # the update's forward: the layers run under torch.utils.checkpoint
        first, second = checkpointed(**inputs).logits, checkpointed(**inputs).logits
    assert torch.equal(first.detach(), second.detach())
    assert torch.equal(first.detach(), expected)

    calls = _fc1_calls(checkpointed)
    _loss(plain, inputs).backward()
    _loss(checkpointed, inputs).backward()
    assert calls[0] == 2 * 2  # two layers, each run in forward and recomputed in backward
    want, got = _grads(plain), _grads(checkpointed)
    assert want.keys() == got.keys() and len(want) == len(list(plain.parameters()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)


def test_checkpointing_keeps_fewer_activations_for_backward():
    tok = make_tokenizer()
    plain, checkpointed = make_opt(len(tok)), make_opt(len(tok))
    enable_gradient_checkpointing(checkpointed)
    inputs = _inputs(len(tok))
    kept, kept_checkpointed = _saved_bytes(plain, inputs), _saved_bytes(checkpointed, inputs)
    # what remains are the embeddings, the final norm, the LM head and the loss; the layers' activations go
    assert kept_checkpointed < 0.6 * kept, (kept_checkpointed, kept)


def test_a_deep_copy_of_a_checkpointed_model_checkpoints_its_own_layers():
    tok = make_tokenizer()
    original = make_opt(len(tok))
    enable_gradient_checkpointing(original)
    clone = copy.deepcopy(original)  # what frozen_reference and Critic.from_policy do
    inputs = _inputs(len(tok))
    with torch.no_grad():
        torch.testing.assert_close(clone(**inputs).logits, original(**inputs).logits, atol=0, rtol=0)
        clone.model.decoder.layers[1].fc2.weight.mul_(2.0)  # the clone's layers use the clone's weights
        assert not torch.equal(clone(**inputs).logits, original(**inputs).logits)
    calls = _fc1_calls(clone)
    _loss(clone, inputs).backward()
    assert calls[0] == 2 * 2  # recomputed in backward
    assert all(p.grad is None for p in original.parameters())  # the gradients reach the clone only
    assert all(p.grad is not None for p in clone.parameters())


def test_lora_wrapped_model_checkpoints_with_the_same_gradients():
    peft = pytest.importorskip("peft")
    tok = make_tokenizer()
    lora = dict(r=4, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    models = []
    for checkpointing in (False, True):
        lm = make_opt(len(tok))
        wrapped = peft.get_peft_model(lm, peft.LoraConfig(**lora))
        torch.manual_seed(3)
        for name, p in wrapped.named_parameters():  # B starts at zero: give the adapters a gradient path of size
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        if checkpointing:
            enable_gradient_checkpointing(lm)
        models.append(wrapped.eval())
    plain, checkpointed = models
    inputs = _inputs(len(tok))
    calls = _fc1_calls(checkpointed)
    for m in models:
        _loss(m, inputs).backward()
    assert calls[0] == 2 * 2
    with torch.no_grad():
        with_adapters = checkpointed(**inputs).logits
        assert torch.equal(with_adapters, plain(**inputs).logits)
        with checkpointed.disable_adapter(), plain.disable_adapter():  # tether's LoRA reference
            reference = checkpointed(**inputs).logits
            assert torch.equal(reference, plain(**inputs).logits)
        assert not torch.equal(reference, with_adapters)  # the adapters (B != 0) really are off in the reference
    want, got = _grads(plain), _grads(checkpointed)
    assert want.keys() == got.keys() and want and all("lora_" in n for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)


def test_a_model_without_checkpointable_layers_is_refused():
    class Plain(PreTrainedModel):
        config_class = PretrainedConfig
        supports_gradient_checkpointing = True

        def __init__(self, config):
            super().__init__(config)
            self.linear = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no checkpointable layers"):
        enable_gradient_checkpointing(Plain(PretrainedConfig()))


@pytest.mark.parametrize("setting", [{}, {"critic": "policy"}, {"lora_r": 4}], ids=["shared", "critic", "lora"])
def test_trainer_with_checkpointing_scores_and_updates_as_without(setting, tmp_path):
    if "lora_r" in setting:
        pytest.importorskip("peft")
    tok = make_tokenizer()
    trainers = {}
    for checkpointing in (False, True):
        cfg = PPOConfig(batch_size=4, minibatch_size=4, ppo_epochs=1, max_new_tokens=6, learning_rate=1e-2, seed=0,
                        gradient_checkpointing=checkpointing, output_dir=str(tmp_path / str(checkpointing)), **setting)
        trainers[checkpointing] = PPOTrainer(cfg, model=make_opt(len(tok)), tokenizer=tok)
    plain, checkpointed = trainers[False], trainers[True]
    modules = [checkpointed.policy.model, checkpointed.critic, checkpointed.ref]  # the transformers models
    assert not any(m.training for module in modules if module is not None for m in module.modules())
    gen = plain.generate(PROMPTS[:4])
    fields = ("logprobs", "ref_logprobs", "values", "kl", "entropy")
    first = checkpointed.score(gen.queries, gen.responses)
    second = checkpointed.score(gen.queries, gen.responses)  # the same rollouts scored again
    expected = plain.score(gen.queries, gen.responses)
    for field in fields:
        assert torch.equal(getattr(first, field), getattr(second, field)), field
        assert torch.equal(getattr(first, field), getattr(expected, field)), field

    calls = {k: _fc1_calls(t.trainable) for k, t in trainers.items()}
    stats = {k: t.step(gen.queries, gen.responses, [0.0, 1.0, 2.0, 0.5]) for k, t in trainers.items()}
    bodies = 1 + (checkpointed.critic is not None)  # the policy's layers, and a separate critic's
    assert calls[True][0] == calls[False][0] + 2 * bodies  # each of two layers recomputed once in backward
    # one epoch of one minibatch: the update's forward (under checkpointing) replays the scoring exactly
    assert abs(stats[True]["ppo/policy/ratio_mean"] - 1.0) < 1e-6
    for key in ("ppo/loss/total", "ppo/policy/ratio_mean", "objective/kl"):
        assert stats[True][key] == pytest.approx(stats[False][key], abs=1e-6), key
    for (name, a), b in zip(plain.trainable.named_parameters(), checkpointed.trainable.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
