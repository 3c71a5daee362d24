"""Prompt sources: a list of strings, a `datasets.Dataset`, a JSONL / CSV file with a prompt column, or
`package.module:function`, a function that returns one of the first two (so a config file can name prompts
that ship inside a package, like the demo's)."""

import importlib
import re
from pathlib import Path

from datasets import Dataset, load_dataset

_FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv"}
_IMPORTABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _import_prompts(name: str):
    """Call the function `package.module:function` names; it returns a list of strings or a Dataset."""
    module_name, function_name = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"prompts {name!r}: cannot import {module_name!r} ({error})") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"prompts {name!r}: {module_name!r} has no function {function_name!r}")
    try:
        return function()
    except TypeError as error:  # most often a function that wants arguments (a reward, say)
        raise TypeError(f"prompts {name!r}: calling it with no arguments failed ({error}); it must return the "
                        f"prompts") from error


def load_prompts(source, column: str = "prompt") -> list[str]:
    """Return the prompts as strings, checked row by row (errors name the row index)."""
    where = "prompts"
    if isinstance(source, str) and _IMPORTABLE.match(source) and not Path(source).exists():
        source, where = _import_prompts(source), f"prompts {source!r}"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix not in _FILE_TYPES:
            missing = "" if path.exists() else " (and no such file exists)"
            raise ValueError(f"prompts file {str(path)!r}: expected one of {sorted(_FILE_TYPES)} (a JSONL or CSV "
                             f"file with a {column!r} column){missing}")
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
        source = load_dataset(_FILE_TYPES[path.suffix], data_files=str(path), split="train")
        where = f"prompts file {str(path)!r}"
    if isinstance(source, Dataset):
        if column not in source.column_names:
            raise ValueError(f"{where} has no {column!r} column (columns: {source.column_names}); "
                             f"set `prompt_column` to the right one")
        source = list(source[column])  # datasets 4+ returns a lazy Column
    if not isinstance(source, (list, tuple)):
        raise TypeError(f"{where} must be a list of strings, a datasets.Dataset, a .jsonl/.csv path or "
                        f"`package.module:function`, "
                        f"not {type(source).__name__}")
    if len(source) == 0:
        raise ValueError(f"{where} is empty: PPO needs at least one prompt")
    for i, prompt in enumerate(source):
        if not isinstance(prompt, str):
            raise TypeError(f"{where}, row {i}: prompt must be a string, got {type(prompt).__name__} {prompt!r}")
        if not prompt.strip():
            raise ValueError(f"{where}, row {i}: prompt is empty")
    return list(source)
