"""Policy = any causal LM + a scalar value head on its last hidden state; reference = frozen copy."""

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from tether.rollout.generate import forward_params, positions

VALUE_HEAD_FILE = "value_head.safetensors"


def load_causal_lm(model: str | PreTrainedModel) -> PreTrainedModel:
    """A hub name or local folder -> AutoModelForCausalLM; a module is returned as is."""
    if isinstance(model, nn.Module):
        return _check_positions(model)
    if not model:
        raise ValueError("no policy model given: set `model` to a hub name or a local folder")
    try:
        return _check_positions(AutoModelForCausalLM.from_pretrained(model))
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load model {model!r} with AutoModelForCausalLM: {err}") from err


def context_length(config) -> int | None:
    """The most positions a model config allows, where it says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def _check_positions(model: PreTrainedModel) -> PreTrainedModel:
    """tether passes explicit position ids so that left padding never shifts positions; a model whose
    forward cannot take them (ALiBi models such as Bloom) would be scored at other positions."""
    if "position_ids" not in forward_params(model):
        raise ValueError(f"{type(model).__name__}.forward takes no position_ids, so tether cannot make scoring "
                         f"positions equal generation positions under left padding; this model is not supported")
    return model


def response_forward(model: PreTrainedModel, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                     hidden: bool = False) -> tuple[Tensor, Tensor | None]:
    """Teacher-forced forward over prompt + response, positions as at generation time.

    Returns logits (B, T, V) where row t predicts response token t, and (if hidden) the last hidden
    state (B, T, H) at the same positions. Only the T response positions are projected onto the
    vocabulary (`logits_to_keep`), not the prompt.
    """
    B, T = response_ids.shape
    P = query_ids.shape[1]
    ids = torch.cat([query_ids, response_ids], 1)
    mask = torch.cat([query_mask, torch.ones_like(response_ids)], 1)
    kwargs = {"logits_to_keep": T + 1} if "logits_to_keep" in forward_params(model) else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                output_hidden_states=hidden, **kwargs)
    logits = out.logits[:, -(T + 1):-1]
    last_hidden = out.hidden_states[-1][:, P - 1:-1] if hidden else None
    return logits, last_hidden


class PolicyWithValueHead(nn.Module):
    """The value head reads the backbone's final hidden state (after the final norm).

    Init: zero weights and bias, so every value starts at 0. With a random head (e.g. Ziegler et al.'s
    N(0, 1/(H+1))) the first steps' GAE advantages are dominated by V(s_t+1) - V(s_t) noise of the size
    of the hidden state, which pushes the policy in random per-token directions; measured on SmolLM2:
    explained variance -7 and KL rising with flat reward. Zero values make the first advantages the plain
    lambda-discounted returns. The head still learns at once: dV/dw = h is not zero.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        hidden_size = model.get_output_embeddings().in_features
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        param = next(model.parameters())
        self.value_head.to(device=param.device, dtype=torch.float32)

    def forward(self, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor) -> tuple[Tensor, Tensor]:
        """-> logits (B, T, V), values (B, T) V(s_t) for the state before response token t."""
        logits, hidden = response_forward(self.model, query_ids, query_mask, response_ids, hidden=True)
        return logits, self.value_head(hidden.float()).squeeze(-1)

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """A folder `AutoModelForCausalLM.from_pretrained` loads; the value head sits beside it."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  directory / VALUE_HEAD_FILE)



def frozen_reference(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen copy in eval mode: the fixed anchor of the KL tether."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref
