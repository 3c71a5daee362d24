"""Attention in fp32 under CPU bf16 autocast.

Autocast runs `scaled_dot_product_attention` in bf16, and on the CPU its bf16 kernels are slower than the fp32
ones, most of all the backward (on SmolLM2-135M with a PPO minibatch, one update's attention backward takes 88
ms in bf16 against 8 ms in fp32). The attention tensors are small next to the projections around them, so
tether runs the attention itself in fp32 and hands its output back in bf16; the projections stay bf16. On the
GPU, bf16 attention kernels are fast and nothing is changed.
"""

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

FP32_SDPA = "tether_fp32_sdpa"


def fp32_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, computed in fp32 whatever the dtype of q, k, v; output in q's dtype."""
    dtype = query.dtype
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


AttentionInterface.register(FP32_SDPA, fp32_sdpa_attention)
AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)  # the same boolean mask sdpa gets


def fp32_attention_on_cpu(model: PreTrainedModel) -> bool:
    """Switch a model that uses sdpa attention to the fp32 variant above; others (eager, flash, models without
    the attention interface) are left alone. Returns whether it was switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(FP32_SDPA)
    return model.config._attn_implementation == FP32_SDPA
