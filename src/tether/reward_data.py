"""Reward-model data: preference pairs or scalar-labelled texts, checked row by row before any model loads.

Files are read with the standard library, not `datasets`, so that a wrong type in one row reaches the
row check (and its error names the row) instead of failing inside an Arrow cast with no row number.
"""

import csv
import math
import numbers
import random
from dataclasses import dataclass
from pathlib import Path

from tether.data import read_json_rows

_SUFFIXES = (".jsonl", ".json", ".csv")


@dataclass
class Pairs:
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    margins: list[float | None]  # None: use the config's margin

    def __len__(self) -> int:
        return len(self.chosen)

    def subset(self, idx: list[int]) -> "Pairs":
        return Pairs(*([field[i] for i in idx] for field in (self.prompts, self.chosen, self.rejected, self.margins)))


@dataclass
class Labelled:
    prompts: list[str]
    texts: list[str]
    labels: list[float]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> "Labelled":
        return Labelled(*([field[i] for i in idx] for field in (self.prompts, self.texts, self.labels)))


def read_rows(source, what: str = "reward data") -> tuple[list[dict], str]:
    """(rows, where): rows as dicts from a file path, a list of dicts or a datasets.Dataset."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = f"{what} file {str(path)!r}"
        if path.suffix not in _SUFFIXES:
            raise ValueError(f"{where}: expected one of {list(_SUFFIXES)}")
        if not path.is_file():
            raise FileNotFoundError(f"{where} does not exist")
        rows = (list(csv.DictReader(path.read_text(encoding="utf-8").splitlines())) if path.suffix == ".csv"
                else read_json_rows(path, where))
    else:
        where = what
        rows = source.to_list() if hasattr(source, "to_list") else source  # datasets.Dataset
    if not isinstance(rows, (list, tuple)):
        raise TypeError(f"{where}: expected a list of rows (dicts), got {type(rows).__name__}")
    if not rows:
        raise ValueError(f"{where} is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"{where}, row {i}: expected an object with named fields, got {type(row).__name__}")
    return list(rows), where


def _text(row: dict, key: str, where: str, i: int, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise ValueError(f"{where}, row {i}: {key!r} is missing (row has {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise TypeError(f"{where}, row {i}: {key!r} must be a string, got {type(value).__name__} {value!r}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{where}, row {i}: {key!r} is empty")
    return value


def _number(row: dict, key: str, where: str, i: int) -> float:
    value = row.get(key)
    if isinstance(value, str):  # CSV cells are text
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{where}, row {i}: {key!r} = {row[key]!r} is not a number") from None
    if value is None:
        raise ValueError(f"{where}, row {i}: {key!r} is missing (row has {sorted(row)})")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}, row {i}: {key!r} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where}, row {i}: {key!r} is {value}, not a finite number")
    return float(value)


def check_pairs(rows: list[dict], where: str) -> Pairs:
    pairs = Pairs([], [], [], [])
    for i, row in enumerate(rows):
        pairs.prompts.append(_text(row, "prompt", where, i, allow_empty=True) if row.get("prompt") is not None else "")
        pairs.chosen.append(_text(row, "chosen", where, i))
        pairs.rejected.append(_text(row, "rejected", where, i))
        has_margin = row.get("margin") not in (None, "")
        pairs.margins.append(_number(row, "margin", where, i) if has_margin else None)
    return pairs


def check_labelled(rows: list[dict], where: str) -> Labelled:
    data = Labelled([], [], [])
    for i, row in enumerate(rows):
        data.prompts.append(_text(row, "prompt", where, i, allow_empty=True) if row.get("prompt") is not None else "")
        data.texts.append(_text(row, "text", where, i))
        data.labels.append(_number(row, "label", where, i))
    return data


def load_reward_data(source, objective: str, what: str = "reward data") -> Pairs | Labelled:
    """Pairs for objective=pairwise (labelled rows are returned as Labelled, to be paired after the split);
    Labelled for objective=regression."""
    rows, where = read_rows(source, what)
    keys = set().union(*(row.keys() for row in rows))
    if objective == "pairwise" and keys & {"chosen", "rejected"}:
        return check_pairs(rows, where)
    if keys & {"text", "label"}:
        return check_labelled(rows, where)
    need = "`text` and `label`" if objective == "regression" else "`chosen` and `rejected` (or `text` and `label`)"
    raise ValueError(f"{where}: objective={objective} needs rows with {need}; row 0 has {sorted(rows[0])}")


def pairs_from_labels(data: Labelled, seed: int) -> Pairs:
    """Each labelled text is paired once with a random text of a different label and the same prompt; the
    higher label is `chosen`. Pairs never cross prompts, so a pair compares responses, not prompts."""
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(data.prompts):
        groups.setdefault(p, []).append(i)
    pairs = Pairs([], [], [], [])
    for members in groups.values():
        for i in members:
            others = [j for j in members if data.labels[j] != data.labels[i]]
            if not others:
                continue
            j = rng.choice(others)
            hi, lo = (i, j) if data.labels[i] > data.labels[j] else (j, i)
            pairs.prompts.append(data.prompts[i])
            pairs.chosen.append(data.texts[hi])
            pairs.rejected.append(data.texts[lo])
            pairs.margins.append(None)
    if not pairs.chosen:
        raise ValueError("cannot build preference pairs from the labelled texts: no prompt has two texts with "
                         "different labels")
    return pairs


def split(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices of a seeded shuffle; eval gets round(n * fraction) rows, at least 1 if asked."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval >= n:
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training rows out of {n}")
    return sorted(order[n_eval:]), sorted(order[:n_eval])
