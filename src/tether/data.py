"""Prompt sources: a list, a `datasets.Dataset`, a JSONL / JSON / CSV file, or `package.module:function`, a
function that returns a list or a Dataset (so a config file can name prompts that ship inside a package, like
the demo's, or generate them at load time).

A prompt is a string or a conversation: a list of chat messages, each `{"role": str, "content": str}`, which the
trainer renders with the tokenizer's chat template. A row's other columns (an `answer`, a `task`, ...) are kept
beside it for the reward (`PromptRows.columns`). JSONL and JSON files are read with the standard library, so
string and conversation prompts can be mixed in one file (Arrow needs one type per column)."""

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, load_dataset

_FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv"}
_IMPORTABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
CONVERSATION_COLUMN = "messages"  # recognised when the prompt column is left at its default and is missing
# Names the reward already receives (positionally, or as what tether knows about a completion): a prompt
# column with one of them would be ambiguous.
RESERVED_COLUMNS = ("prompts", "completions", "ended", "completion_tokens")


@dataclass
class PromptRows:
    prompts: list  # (N,) str or list of {"role", "content"} messages
    columns: list[dict]  # (N,) each row's other columns (empty dicts for a list of strings)

    @property
    def column_names(self) -> list[str]:
        return list(dict.fromkeys(k for row in self.columns for k in row))


def _import_prompts(name: str):
    """Call the function `package.module:function` names; it returns a list or a Dataset."""
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


def read_json_rows(path: Path, where: str) -> list:
    """The rows of a JSONL file (one JSON value a line) or of a JSON file holding a list; errors begin with
    `where` (e.g. "prompts file 'p.jsonl'") and name the line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON: {err}") from None
        if not isinstance(rows, list):
            raise ValueError(f"{where}: expected a JSON list of rows, got {type(rows).__name__}")
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}, line {n}: not valid JSON ({err.msg})") from None
    return rows


def load_prompt_rows(source, column: str = "prompt") -> PromptRows:
    """The prompts and each row's other columns, checked row by row (errors name the row index). A list may
    hold prompts (strings, conversations) or rows (dicts with the prompt column)."""
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
        where = f"prompts file {str(path)!r}"
        source = (read_json_rows(path, where) if path.suffix != ".csv"
                  else load_dataset("csv", data_files=str(path), split="train"))
    if isinstance(source, Dataset):
        source = source.to_list()
    if not isinstance(source, (list, tuple)):
        raise TypeError(f"{where} must be a list of prompts or rows, a datasets.Dataset, a .jsonl/.csv path or "
                        f"`package.module:function`, not {type(source).__name__}")
    if len(source) == 0:
        raise ValueError(f"{where} is empty: PPO needs at least one prompt")
    rows = [r if _is_row(r) else {column: r} for r in source]
    if any(_is_row(r) for r in source):
        column = _prompt_column(rows, column, where)
    prompts, columns = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"{where}, row {i}: expected an object with a {column!r} key, got {type(row).__name__}")
        if column not in row:
            raise ValueError(f"{where}, row {i} has no {column!r} key (keys: {sorted(row)})")
        prompts.append(check_prompt(row[column], f"{where}, row {i}"))
        columns.append({k: v for k, v in row.items() if k != column})
    reserved = [k for k in RESERVED_COLUMNS if any(k in row for row in columns)]
    if reserved:
        raise ValueError(f"{where}: column(s) {reserved} clash with what the reward already receives under those "
                         f"names; rename them")
    return PromptRows(prompts, columns)


def load_prompts(source, column: str = "prompt") -> list:
    """The prompts alone (strings or conversations); see load_prompt_rows."""
    return load_prompt_rows(source, column).prompts


def _is_row(item) -> bool:
    """A dict that is a row, not a lone chat message."""
    return isinstance(item, dict)


def _prompt_column(rows: list[dict], column: str, where: str) -> str:
    """The prompt column: `column`, or `messages` when `column` is the default `prompt` and no row has it."""
    names = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
    if column in names:
        return column
    if column == "prompt" and CONVERSATION_COLUMN in names:
        return CONVERSATION_COLUMN
    raise ValueError(f"{where} has no {column!r} column (columns: {names}); set `prompt_column` to the right one "
                     f"(a {CONVERSATION_COLUMN!r} column of chat messages is recognised too)")


def check_prompt(prompt, where: str):
    """A prompt as it is: a non-empty string, or a non-empty list of {"role": str, "content": str} messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: prompt is empty")
        return prompt
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"{where}: prompt must be a string, got {type(prompt).__name__} {prompt!r} (or a "
                        f"conversation: a list of chat messages {{'role': ..., 'content': ...}})")
    if not prompt:
        raise ValueError(f"{where}: the conversation has no messages")
    for j, message in enumerate(prompt):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise TypeError(f"{where}, message {j}: expected {{'role': str, 'content': str}}, got {message!r}")
    if not any(m["content"].strip() for m in prompt):
        raise ValueError(f"{where}: every message of the conversation is empty")
    return [dict(m) for m in prompt]
