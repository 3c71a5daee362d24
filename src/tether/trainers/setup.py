"""Trainer set-up helpers: seeding, tokenizer and EOS handling, and checks on what users pass in."""

import ctypes
import logging
import platform
import random

import numpy as np
import torch
from torch import Tensor
from transformers import AutoTokenizer

from tether.models.paths import check_model_folder

log = logging.getLogger("tether")


def check_token_rows(rows, what: str, vocab_size: int) -> None:
    """Each row must be a non-empty 1-D integer tensor of ids inside the vocabulary. An empty prompt would
    sample its first token from a padding position, at a different position than it is scored at."""
    for i, row in enumerate(rows):
        if not isinstance(row, Tensor) or row.dim() != 1 or row.dtype.is_floating_point or row.dtype == torch.bool:
            got = type(row).__name__ + ("" if not isinstance(row, Tensor) else f" {row.dtype} {tuple(row.shape)}")
            raise TypeError(f"{what} {i}: expected a 1-D tensor of token ids, got {got}")
        if len(row) == 0:
            raise ValueError(f"{what} {i} has no tokens")
        if row.min() < 0 or row.max() >= vocab_size:
            raise ValueError(f"{what} {i} holds token id {int(row.max() if row.max() >= vocab_size else row.min())}, "
                             f"outside the model's vocabulary of {vocab_size}")


def check_step_inputs(queries: list[Tensor], responses: list[Tensor], scores, local_batch: int, group: int,
                      vocab_size: int, needs: str) -> Tensor:
    """The step API's input checked (sizes, token ids, groups of `group` completions of one prompt); the
    scores as a (B,) float tensor. needs: how the batch size reads in a message."""
    if not (len(queries) == len(responses) == local_batch):
        raise ValueError(f"step got {len(queries)} queries and {len(responses)} responses; both must equal {needs}")
    check_token_rows(queries, "query", vocab_size)
    check_token_rows(responses, "response", vocab_size)
    for start in range(0, len(queries), group):
        for i in range(start + 1, start + group):
            if not torch.equal(queries[i], queries[start]):
                raise ValueError(f"num_generations={group}: rows {start}..{start + group - 1} must be completions of "
                                 f"one prompt, but query {i} differs from query {start}")
    raw_scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if len(raw_scores) != local_batch:
        raise ValueError(f"step got {len(raw_scores)} scores; it needs {needs}")
    return raw_scores


def encode_prompt(tokenizer, model, max_new_tokens: int, text, where: str) -> Tensor:
    """A prompt's token ids, refused when empty or too long for the model's context with max_new_tokens. text: a
    string, or a conversation (chat messages), whose ids are the chat template's with the generation prompt."""
    from tether.chat import chat_ids, is_conversation, readable
    from tether.models.policy import context_length

    if is_conversation(text):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{where} is a conversation but the tokenizer has no chat template; set the config "
                             f"key `chat_template` (a file, or chatml)")
        ids, text = torch.tensor(chat_ids(tokenizer, text), dtype=torch.long), readable(text)
    else:
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    context = context_length(model.config)
    if len(ids) == 0:
        raise ValueError(f"{where} {text!r} tokenises to no tokens")
    if context is not None and len(ids) + max_new_tokens > context:
        raise ValueError(f"{where} is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that "
                         f"exceeds the model's context of {context} tokens. Shorten the prompt or lower "
                         f"max_new_tokens. Prompt starts: {text[:80]!r}")
    return ids


def keep_freed_memory() -> bool:
    """Process-wide, glibc only: serve every allocation from the heap and trim the heap only once more than
    2 GiB at its top is free, so memory the process frees is reused as it is. By default glibc maps each block
    above a threshold (at most 32 MB) fresh from the system and unmaps it on free, so every step's large buffers
    (full-vocabulary logits, the gradient of a tied embedding, autocast's bf16 weight copies) page-fault in
    again, zero-filled, one page at a time: a 28 M element fp32 -> bf16 cast takes 18 ms that way and 9 ms from
    reused memory. The resident size then stays near its peak instead of shrinking after it. It overrides
    GLIBC_TUNABLES' malloc settings and lasts until the process ends. Returns whether it was applied (False on
    other C libraries)."""
    return _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # <malloc.h>


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's mallopt for each (parameter, value); False where the C library is not glibc or refuses one."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def return_large_buffers() -> bool:
    """Process-wide, glibc only: every block above 4 MiB mapped fresh from the system and unmapped when freed (a
    fixed threshold, where glibc's own rises to 32 MiB after the first such free). The vocabulary blocks of
    `models/head.py` (up to 32 MB each, dozens per forward pass) are then given back as they are freed; served
    from the heap instead, each block's freed logits get split by the small tensors that outlive it and the next
    block needs fresh memory, so the process's peak grows with the number of blocks (measured: 2.1-2.3 GB instead
    of 0.9 GB at 240 response tokens of a 151,936-token vocabulary). Returns whether it was applied."""
    return _mallopt((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 4 << 20), (_M_TRIM_THRESHOLD, 128 << 10))


def check_compile(device: torch.device, sharded_by: str = "") -> None:
    """What compile=true needs, checked before any model is loaded: whole parameters on every process (one
    process, DDP or DeepSpeed ZeRO-2; `sharded_by` names the sharding otherwise), and on the CPU a C++ compiler
    for torch.compile's inductor backend (it generates and builds C++ kernels at the first step)."""
    if sharded_by:
        raise ValueError(f"compile=true with sharded parameters ({sharded_by}) is not supported yet: their gathering "
                         f"hooks make the compiler recompile until it gives up; use DDP or ZeRO-2, or set "
                         f"compile=false")
    if device.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as err:  # inductor raises its own InvalidCxxCompiler; any failure here means the same
            raise RuntimeError("compile=true on the CPU needs a C++ compiler for torch.compile's inductor backend, "
                               "and none was found: install g++ (or set CXX to a compiler), or set "
                               "compile=false") from err


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_tokenizer(tokenizer, model, chat_template: str | None = None):
    """The tokenizer given, else the model's; with the `chat_template` key's template when it is set."""
    from tether.chat import set_chat_template

    if tokenizer is None:
        if not isinstance(model, str) or not model:
            raise ValueError("pass tokenizer=... when the policy is given as a module rather than a name or folder")
        check_model_folder(model, "model", tokenizer=True)  # the whole folder, before anything of it loads
        try:
            tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as err:
            raise ValueError(f"could not load a tokenizer for model {model!r}: {err}") from err
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; tether needs one to know where a completion ends")
    if tokenizer.pad_token_id is None:
        log.info("tokenizer has no pad token; using EOS (%r) for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    set_chat_template(tokenizer, chat_template)
    return tokenizer


def eos_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS plus any extra EOS ids in the model's generation config (e.g. chat end tokens)."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    vocab = model.get_output_embeddings().out_features
    ids.update(i for i in ([extra] if isinstance(extra, int) else (extra or [])) if 0 <= i < vocab)
    return sorted(ids)


def ended(responses: list[Tensor], eos_token_ids: list[int]) -> Tensor:
    """(B,) bool: the response holds an EOS (it stopped; the rest were cut at max_new_tokens)."""
    eos = torch.tensor(eos_token_ids)
    return torch.tensor([bool(torch.isin(r.cpu(), eos).any()) for r in responses], dtype=torch.bool)


def eos_rate(response_ids: Tensor, mask: Tensor, eos_token_ids: list[int]) -> float:
    """Share of completions whose last counted token is an EOS (the rest hit max_new_tokens)."""
    last = response_ids.gather(1, (mask.sum(-1).long().clamp(min=1) - 1)[:, None]).squeeze(1)
    return torch.isin(last, torch.tensor(eos_token_ids, device=last.device)).float().mean().item()


# One-sided Student-t critical values for p = 0.001, by degrees of freedom (standard tables).
_T_001 = {1: 318.3, 2: 22.33, 3: 10.21, 4: 7.173, 5: 5.893, 6: 5.208, 7: 4.785, 8: 4.501, 9: 4.297, 10: 4.144,
          12: 3.930, 15: 3.733, 20: 3.552, 30: 3.385, 60: 3.232, 120: 3.160}


def t_critical_001(df: int) -> float:
    """Critical value at df, taking the nearest tabulated df at or below it (conservative); 3.09 beyond."""
    if df > 120:
        return 3.090
    return _T_001[max(k for k in _T_001 if k <= df)]


def make_adamw(params, **kwargs) -> torch.optim.AdamW:
    """Fused AdamW where torch has it (CPU and CUDA since torch 2.4): one kernel over all parameters instead
    of a dozen elementwise ops per tensor, ~7x faster per step on a 2-core CPU. Same update rule."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: no autocast)."""
    if precision == "fp32":
        return None
    supported = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and supported else None
    if not supported:
        raise ValueError(f"precision=bf16 but {device} does not support bfloat16; use precision=fp32 or auto")
    return torch.bfloat16


def add_lora(lm, c):
    """Wrap `lm` in place with LoRA adapters (PEFT) and freeze its own weights; returns the PeftModel."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("lora_r > 0 needs PEFT: pip install 'tether[peft]'") from err
    # No LoRA dropout: tether keeps modules in eval mode (dropout would make the PPO ratio noisy).
    lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=c.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(lm, lora)
    except ValueError as err:
        raise ValueError(f"lora_target_modules={c.lora_target_modules!r}: {err}") from err
    return peft_model.eval()
