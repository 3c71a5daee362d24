"""Attention in fp32 under CPU bf16 autocast.

Autocast runs `scaled_dot_product_attention` in bf16, and on the CPU its bf16 kernels are slower than the fp32
ones, most of all the backward (on SmolLM2-135M with a PPO minibatch, one update's attention backward takes 88
ms in bf16 against 8 ms in fp32). The attention tensors are small next to the projections around them, so
tether runs the attention itself in fp32 and hands its output back in bf16; the projections stay bf16. This is
more precise than bf16 attention, not less. On the GPU, bf16 attention kernels are fast and nothing is changed.
"""

import logging

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from tether.models.policy import probe_outputs

log = logging.getLogger("tether")

FP32_SDPA = "tether_fp32_sdpa"


def _fp32(t):
    return t.float() if torch.is_tensor(t) and t.is_floating_point() else t


def fp32_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention computed in fp32 whatever the dtype of q, k, v (and of a float mask or
    position bias); the output comes back in q's dtype."""
    dtype = query.dtype
    if "position_bias" in kwargs:
        kwargs["position_bias"] = _fp32(kwargs["position_bias"])
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, _fp32(query), _fp32(key), _fp32(value), _fp32(attention_mask),
                                              **kwargs)
    return out.to(dtype), weights


AttentionInterface.register(FP32_SDPA, fp32_sdpa_attention)
AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)  # the same boolean mask sdpa gets


def fp32_attention_on_cpu(model: PreTrainedModel) -> bool:
    """Switch a model that uses sdpa attention to the fp32 variant above, on fp32 weights and outside autocast.
    Others (eager, flash, models without the attention interface) are left alone, and so is a model whose
    outputs the switch would change: some modelling code takes other paths unless the name is exactly "sdpa"
    (Gemma 4's shared key/value layers do), which the probe forwards before and after detect. Returns
    whether it was switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation():
        return False
    before = probe_outputs(model)
    model.set_attn_implementation(FP32_SDPA)
    if model.config._attn_implementation != FP32_SDPA:
        return False
    if not all(torch.equal(a, b) for a, b in zip(before, probe_outputs(model))):
        model.set_attn_implementation("sdpa")
        log.warning("%s: fp32 attention under bf16 autocast would change its outputs; it keeps sdpa",
                    type(model).__name__)
        return False
    return True
