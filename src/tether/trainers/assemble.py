"""Trainer set-up, part 2: the models a trainer holds, loaded and made ready before anything is wrapped for
several processes. The policy (with a value head when the algorithm uses a critic but has no separate one), a
separate critic, the frozen reference or LoRA adapters in its place, and the reward; then what precision and
gradient checkpointing change on them."""

from dataclasses import dataclass

import torch

from tether.config import PPOConfig
from tether.distributed import Ranks
from tether.models.attention import fp32_attention_on_cpu
from tether.models.head import separable_head
from tether.models.policy import (
    Critic,
    PolicyWithValueHead,
    build_critic,
    enable_gradient_checkpointing,
    frozen_reference,
    linear_weights_in,
    load_causal_lm,
)
from tether.chat import reward_text
from tether.data import PromptRows
from tether.rewards import resolve_reward
from tether.trainers.setup import add_lora


@dataclass
class Models:
    policy: PolicyWithValueHead
    critic: Critic | None  # a separate critic (ppo with critic=policy, reward or a path); None: shared or none
    ref: torch.nn.Module | None  # the frozen reference; None with LoRA (the policy with its adapters disabled)
    ref_head: torch.nn.Module | None  # the reference's separable LM head (models.head.separable_head), or None
    peft: torch.nn.Module | None  # the PeftModel around the policy's LM with LoRA, else None
    reward: object  # the resolved reward (callable or reward model adapter), None when none was given
    vocab_size: int


def build_models(c: PPOConfig, ranks: Ranks, device: torch.device, autocast_dtype: torch.dtype | None,
                 uses_critic: bool, tokenizer, model=None, ref_model=None, reward=None, local_batch: int = 1) -> Models:
    """The config's models, or the modules given (model, ref_model, reward override the config's keys)."""
    chunk_rows = logits_block_rows(c, ranks)
    # Loaded whole on every process; under ZeRO-3 the engine shards the trained module when it is prepared.
    with ranks.whole_models():
        reward = reward if reward is not None else c.reward
        resolved = resolve_reward(reward, device, local_batch) if reward is not None else None

        lm = load_causal_lm(model if model is not None else c.model).to(device).eval()
        vocab_size = lm.get_output_embeddings().out_features
        # before LoRA: a policy-initialised critic copies the plain body
        critic = build_critic(c.critic, lm, reward, tokenizer, device) if uses_critic else None
        if c.lora_r:
            peft, ref = add_lora(lm, c), None
        else:
            peft = None
            ref = frozen_reference(load_causal_lm(ref_model).to(device) if ref_model is not None else lm)
            ref_vocab = ref.get_output_embeddings().out_features
            if ref_vocab != vocab_size:
                raise ValueError(f"the reference model's vocabulary ({ref_vocab}) differs from the policy's "
                                 f"({vocab_size}); the KL needs both over the same tokens")
    policy = PolicyWithValueHead(lm, value_head=uses_critic and critic is None, logits_chunk_rows=chunk_rows)
    # probed before the reference's linear layers go to bf16 (which only runs under autocast)
    ref_head = policy.head if ref is None else separable_head(ref)
    if autocast_dtype is not None and device.type == "cpu":  # bf16 autocast on the CPU
        for m in (lm, ref, critic.body if critic is not None else None):
            if m is not None:
                fp32_attention_on_cpu(m)
    if autocast_dtype is not None and ref is not None:  # the reference only runs under autocast
        linear_weights_in(ref, autocast_dtype)
    if c.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
        if critic is not None:
            enable_gradient_checkpointing(critic.body)
    return Models(policy, critic, ref, ref_head, peft, resolved, vocab_size)


def logits_block_rows(c: PPOConfig, ranks: Ranks) -> int:
    """The `logits_chunk_rows` the policy uses. Under DeepSpeed ZeRO-3 every call of the LM head gathers its weight
    from all processes, so all must call it equally often; the number of blocks follows each process's own
    micro-batch shapes, so there the whole micro-batch is one block (refused when set explicitly)."""
    if ranks.zero_stage != 3:
        return c.logits_chunk_rows
    if c.logits_chunk_rows:
        raise ValueError(f"logits_chunk_rows={c.logits_chunk_rows} under DeepSpeed ZeRO-3 is not supported: each LM-head "
                         f"call gathers the head's weight from every process, and the number of blocks differs "
                         f"between processes; leave it 0 (one block per micro-batch there), or use FSDP or ZeRO-2")
    return 1 << 62


def prompt_fields(rows: PromptRows | None, tokenizer) -> tuple[list | None, list[dict], list[str]]:
    """The trainer's prompts (str or conversation), each row's other columns, and each prompt as the reward sees
    it (a conversation rendered by its chat template, as text)."""
    if rows is None:
        return None, [], []
    return rows.prompts, rows.columns, [reward_text(tokenizer, p) for p in rows.prompts]


def column_names(*tables: PromptRows | None) -> list[str]:
    """The prompt rows' other columns (training and held-out), each once: what a reward may ask for by name."""
    return list(dict.fromkeys(k for t in tables if t is not None for k in t.column_names))
