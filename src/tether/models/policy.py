"""Policy = any causal LM (+ a scalar value head on its last hidden state); reference = frozen copy;
a separate critic = a transformer body + a value head."""

import copy
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Cache, PreTrainedModel

from tether.models.head import PerToken, block_rows, over_positions, separable_head
from tether.models.paths import check_model_folder
from tether.rollout.generate import Rollout, forward_params, positions, sample

VALUE_HEAD_FILE = "value_head.safetensors"
log = logging.getLogger("tether")


def load_causal_lm(model: str | PreTrainedModel) -> PreTrainedModel:
    """A hub name or local folder -> AutoModelForCausalLM in float32 (trained weights and AdamW state stay fp32,
    whatever dtype the folder stores; bf16 is autocast, see `precision`); a module is returned as is."""
    if isinstance(model, nn.Module):
        return _check_positions(model)
    if not model:
        raise ValueError("no policy model given: set `model` to a hub name or a local folder")
    check_model_folder(model, "model")
    try:
        return _check_positions(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32))
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
    vocabulary (`logits_to_keep`), not the prompt. The whole (B, T, V) block at once: what tests and probes
    compare against; training and scoring go through `response_states` and `over_positions` instead.
    """
    T = response_ids.shape[1]
    kwargs = {"logits_to_keep": T + 1} if "logits_to_keep" in forward_params(model) else {}
    out = model(**_teacher_forced(query_ids, query_mask, response_ids), use_cache=False,
                output_hidden_states=hidden, **kwargs)
    logits = out.logits[:, -(T + 1):-1].float()  # log-prob math in fp32 also under bf16 autocast
    last_hidden = out.hidden_states[-1][:, query_ids.shape[1] - 1:-1] if hidden else None
    return logits, last_hidden


def response_states(model: PreTrainedModel, head: nn.Module | None, query_ids: Tensor, query_mask: Tensor,
                    response_ids: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """The teacher-forced forward without the (B, T, V) logits: -> (states, last hidden state (B, T, H),
    project), where project(states[block]) are that block's logits. With a separable LM head (`separable_head`)
    the states are the final hidden states and project is the head; without one, the model's own logits
    (B, T, V) and the identity."""
    if head is None:
        logits, hidden = response_forward(model, query_ids, query_mask, response_ids, hidden=True)
        return logits, hidden, _identity
    # one position's logits, not the whole sequence's (a model without logits_to_keep has no head to separate)
    out = model(**_teacher_forced(query_ids, query_mask, response_ids), use_cache=False, output_hidden_states=True,
                logits_to_keep=1)
    hidden = out.hidden_states[-1][:, query_ids.shape[1] - 1:-1]
    return hidden, hidden, head


def _identity(x: Tensor) -> Tensor:
    return x


def _teacher_forced(query_ids: Tensor, query_mask: Tensor, response_ids: Tensor) -> dict[str, Tensor]:
    ids = torch.cat([query_ids, response_ids], 1)
    mask = torch.cat([query_mask, torch.ones_like(response_ids)], 1)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}


def _zero_value_head(hidden_size: int, like: nn.Module) -> nn.Linear:
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head.to(device=next(like.parameters()).device, dtype=torch.float32)


class PolicyWithValueHead(nn.Module):
    """The value head reads the backbone's final hidden state (after the final norm).

    Init: zero weights and bias, so every value starts at 0. With a random head (e.g. Ziegler et al.'s
    N(0, 1/(H+1))) the first steps' GAE advantages are dominated by V(s_t+1) - V(s_t) noise of the size
    of the hidden state, which pushes the policy in random per-token directions; measured on SmolLM2:
    explained variance -7 and KL rising with flat reward. Zero values make the first advantages the plain
    lambda-discounted returns. The head still learns at once: dV/dw = h is not zero.
    """

    def __init__(self, model: PreTrainedModel, value_head: bool = True, logits_chunk_rows: int = 0) -> None:
        super().__init__()
        self.model = model
        self.value_head = _zero_value_head(model.get_output_embeddings().in_features, model) if value_head else None
        self.head = separable_head(model)  # None: scored from the model's own logits (see response_states)
        self.block_rows = block_rows(logits_chunk_rows, model.get_output_embeddings().out_features)

    def forward(self, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, per_token: PerToken | None = None
                ) -> tuple[Tensor | dict[str, Tensor], Tensor | None]:
        """-> values (B, T) V(s_t) for the state before response token t (None without a value head), after
        per_token's results over every response position, a block of positions at a time (`over_positions`); without
        per_token, the logits (B, T, V) whole."""
        if per_token is None:
            logits, hidden = response_forward(self.model, query_ids, query_mask, response_ids,
                                              hidden=self.value_head is not None)
            return logits, self._values(hidden)
        states, hidden, project = response_states(self.model, self.head, query_ids, query_mask, response_ids)
        return over_positions(per_token, states, project, self.block_rows), self._values(hidden)

    def _values(self, hidden: Tensor | None) -> Tensor | None:
        return None if hidden is None or self.value_head is None else self.value_head(hidden.float()).squeeze(-1)

    def save_pretrained(self, directory: str | Path, tokenizer=None, model: PreTrainedModel | None = None,
                        state_dict: dict[str, Tensor] | None = None) -> None:
        """A folder `AutoModelForCausalLM.from_pretrained` loads; the value head sits beside it. `model` stands in
        for the policy's own (e.g. a copy with LoRA merged in); `state_dict` (keys model.*, value_head.*) for
        its weights, when this module's own are shards."""
        directory = Path(directory)
        model = model if model is not None else self.model
        whole = {} if state_dict is None else {"state_dict": state_dict_part(state_dict, "model.")}
        model.save_pretrained(directory, **whole)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        if self.value_head is not None:
            head = self.value_head.state_dict() if state_dict is None else state_dict_part(state_dict, "value_head.")
            save_value_head(head, directory)


def save_value_head(head: dict[str, Tensor], directory: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, directory / VALUE_HEAD_FILE)


def state_dict_part(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


class Critic(nn.Module):
    """A value model apart from the policy: a transformer body (no LM head) and a linear head at every
    position. Causal bodies only: V(s_t) must not see the tokens after t."""

    def __init__(self, body: PreTrainedModel, head: nn.Linear) -> None:
        super().__init__()
        if head.out_features != 1:
            raise ValueError(f"a critic's head must have one output, this one has {head.out_features}")
        self.body, self.head = body, head.float()

    @classmethod
    def from_policy(cls, lm: PreTrainedModel) -> "Critic":
        """A copy of the policy's body (weights as they are now) with a zero-initialised head."""
        body = copy.deepcopy(lm.base_model)
        return cls(body, _zero_value_head(lm.get_output_embeddings().in_features, lm))

    @classmethod
    def from_reward_model(cls, folder: str) -> "Critic":
        """The body and score head of a causal-LM reward model folder (AutoModelForSequenceClassification,
        one label): its values start out on the reward's scale."""
        try:
            model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise ValueError(f"critic: could not load {folder!r} as a sequence-classification model: {err}") from err
        if not _is_causal(model.base_model):
            raise ValueError(f"critic: {folder!r} is a {model.config.model_type} model whose state at token t "
                             f"sees later tokens (not causal), so it cannot value the state before token t")
        head = getattr(model, "score", None)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"critic: {folder!r} ({type(model).__name__}) has no linear `score` head to reuse")
        if head.bias is None:  # a bias lets the value's offset move independently of the body
            with_bias = nn.Linear(head.in_features, head.out_features)
            with torch.no_grad():
                with_bias.weight.copy_(head.weight)
                with_bias.bias.zero_()
            head = with_bias
        return cls(_check_positions(model.base_model), head)

    def forward(self, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor) -> Tensor:
        """-> values (B, T): V(s_t) for the state before response token t."""
        out = self.body(**_teacher_forced(query_ids, query_mask, response_ids), use_cache=False)
        hidden = out.last_hidden_state[:, query_ids.shape[1] - 1:-1]
        return self.head(hidden.float()).squeeze(-1)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """The body's folder with the head beside it; `state_dict` (keys body.*, head.*) stands in for the
        weights when this module's own are shards."""
        directory = Path(directory)
        self.body.save_pretrained(directory, **({} if state_dict is None else {"state_dict": state_dict_part(state_dict,
                                                                                                         "body.")}))
        save_value_head(self.head.state_dict() if state_dict is None else state_dict_part(state_dict, "head."),
                        directory)


class Trained(nn.Module):
    """Everything the optimiser trains, as one module: the policy (with its value head when it has one) and a
    separate critic when there is one. One module gives one DDP wrapper or DeepSpeed engine, and one
    checkpoint (keys `policy.*`, `critic.*`)."""

    def __init__(self, policy: PolicyWithValueHead, critic: Critic | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
        # the transformer blocks, for FSDP's per-block wrapping (TRANSFORMER_BASED_WRAP)
        models = [policy.model] + ([critic.body] if critic is not None else [])
        self._no_split_modules = sorted({n for m in models for n in (getattr(m, "_no_split_modules", None) or [])})

    def rollout(self, *args, **kwargs) -> Rollout:
        """Sampling with the policy (`tether.rollout.sample(policy, *args, **kwargs)`). A method of the trained
        module so that FSDP can run a whole rollout as one forward pass of its root unit (`Ranks.prepare`)."""
        return sample(self.policy.model, *args, **kwargs)

    def forward(self, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, per_token: PerToken | None = None
                ) -> tuple[Tensor | dict[str, Tensor], Tensor | None]:
        """-> the policy's per_token results (or its logits (B, T, V) without per_token, see
        PolicyWithValueHead.forward), values (B, T) from the critic or the value head (None without either)."""
        out, values = self.policy(query_ids, query_mask, response_ids, per_token)
        if self.critic is not None:
            values = self.critic(query_ids, query_mask, response_ids)
        return out, values


def build_critic(kind: str, lm: PreTrainedModel, reward, tokenizer, device) -> Critic | None:
    """The `critic` config key -> None (shared: a head on the policy), a copy of the policy's body (policy), or
    the body and head of a causal reward-model folder (reward: the `reward` given; or a path)."""
    if kind == "shared":
        return None
    if kind == "policy":
        return Critic.from_policy(lm).to(device).eval()
    folder = reward if kind == "reward" else kind
    if not isinstance(folder, (str, Path)):
        raise ValueError("critic=reward needs the reward to be a reward-model folder, not a callable")
    from transformers import AutoTokenizer

    check_model_folder(folder, "critic", tokenizer=True)
    if AutoTokenizer.from_pretrained(folder).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"critic: {folder!r} has a different tokenizer than the policy; a critic reads the "
                         f"policy's token ids, so it must share the policy's vocabulary")
    return Critic.from_reward_model(str(folder)).to(device).eval()


@torch.no_grad()
def _is_causal(body: PreTrainedModel) -> bool:
    """Probe: changing the last token must leave every earlier position's state unchanged."""
    device = next(body.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4]], device=device)
    changed = ids.clone()
    changed[0, -1] = 5
    states = [body(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[0, :-1] for x in (ids, changed)]
    return torch.allclose(states[0], states[1], atol=1e-6)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each transformer layer in backward instead of keeping its activations, with every module left
    in eval mode.

    transformers checkpoints a `GradientCheckpointingLayer` only while it is in training mode, and putting a
    layer in training mode switches on the dropout that many layers apply on their own `self.training` (OPT,
    Falcon, BioGPT, XGLM, DBRX, ...: `nn.functional.dropout(..., training=self.training)`). tether keeps
    every model in eval mode (dropout would make the PPO ratios noisy), so it does not use transformers'
    switch: each outermost such layer gets an instance-level `forward` that runs the layer's own forward
    under `torch.utils.checkpoint` (non-reentrant) whenever gradients are on. The layer computes exactly what
    it computes without checkpointing (same values, same gradients); only its activations are dropped and
    recomputed in backward. The wrapper is a `functools.partial` of the layer, so `copy.deepcopy` (the
    reference, a critic copied from the policy) gives a copy that checkpoints its own layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    outermost: list[str] = []  # a layer inside a checkpointed layer is recomputed with it already
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(name.startswith(f"{o}.") for o in outermost):
            outermost.append(name)
            inner = module.__dict__.get("forward")  # a forward already set on the instance (accelerate's hooks)
            if not (isinstance(inner, functools.partial) and inner.func is _checkpointed_forward):
                module.forward = functools.partial(_checkpointed_forward, module, inner)
    if not outermost:
        raise ValueError(f"{type(model).__name__} has no checkpointable layers (no GradientCheckpointingLayer), "
                         f"so gradient checkpointing cannot be enabled for it; set gradient_checkpointing=false")


def _checkpointed_forward(layer: nn.Module, inner, *args, **kwargs):
    """`layer`'s forward (`inner`, or its class's), checkpointed when gradients are on and no KV cache is passed
    (the recompute would write the cache a second time): under no_grad there is no backward to replay it."""
    forward = inner if inner is not None else type(layer).forward.__get__(layer)
    if not torch.is_grad_enabled() or any(isinstance(a, Cache) for a in (*args, *kwargs.values())):
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


@torch.no_grad()
def probe_outputs(model: PreTrainedModel) -> list[Tensor]:
    """Two short forwards that a set-up change must leave unchanged: one without a mask and one with a
    left-padded row, keeping several positions' logits (as tether's scoring does); the last hidden state for a
    model without an LM head."""
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 1, 2, 3, 4]], device=device) % model.get_input_embeddings().num_embeddings
    outs = []
    for mask in (None, torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], device=device)):
        kwargs = {"logits_to_keep": 3} if "logits_to_keep" in forward_params(model) else {}
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
        outs.append(out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state)
    return outs


def linear_weights_in(model: PreTrainedModel, dtype: torch.dtype) -> int:
    """Store the weights and biases of `model`'s linear layers (nn.Linear, GPT-2's Conv1D) in `dtype`. Only for
    a frozen model that only ever runs under autocast to `dtype` (tether's reference under bf16; called outside
    autocast, it would then fail on mixed dtypes): autocast casts these to `dtype` at every matmul anyway, so
    its outputs stay the same bit for bit, while the per-forward casts go and the weights take half the
    memory. A weight shared with the input embedding (a tied LM head) stays, since the embedding lookup reads
    it at full precision. The probe forwards under autocast, before and after, checks the outputs are
    unchanged (modelling code could read a weight outside an autocast op); if not, every weight is put back.
    Returns how many parameters were converted."""
    from transformers.pytorch_utils import Conv1D

    kept = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    kept.add(id(model.get_input_embeddings().weight))
    targets = [p for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)) for p in m.parameters(recurse=False)
               if id(p) not in kept and p.is_floating_point() and p.dtype != dtype]
    originals = [p.data for p in targets]
    with torch.autocast(next(model.parameters()).device.type, dtype=dtype):
        before = probe_outputs(model)
        for p in targets:
            p.data = p.data.to(dtype)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, probe_outputs(model)))
    if not unchanged:
        for p, data in zip(targets, originals):
            p.data = data
        log.warning("%s: storing its linear layers in %s would change its outputs under autocast; the "
                    "reference keeps its weights as they are", type(model).__name__, dtype)
        return 0
    return sum(p.numel() for p in targets)


def frozen_reference(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen copy in eval mode: the fixed anchor of the KL tether."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref
