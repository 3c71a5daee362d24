"""Reading a run folder's `metrics.jsonl` and `samples.jsonl` back.

Readers, not sinks: a report is often built after the fact, from a copied run
folder, so the files are the interface and these functions trust nothing in
them beyond the documented format.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Series:
    """One metric over a run: `values[i]` was logged at `steps[i]`, finite values only."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


def _records(path: Path):
    """(line number, dict) per non-blank line; a clear ValueError names a bad line."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            step = record.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError(f"{path}, line {number}: needs an integer 'step', got {step!r}")
            yield number, record


def read_metrics(path: str | Path) -> dict[str, Series]:
    """Metric name -> Series. Keys may come and go between lines; null, NaN and
    non-numeric values are skipped rather than plotted as zeros."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}: a report needs the run's metrics.jsonl")
    series: dict[str, Series] = {}
    for _, record in _records(path):
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                entry = series.setdefault(key, Series())
                entry.steps.append(record["step"])
                entry.values.append(float(value))
    return series


def read_samples(path: str | Path) -> list[dict]:
    """All sample rows in file order; [] when the run logged none (file absent or empty)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [record for _, record in _records(path)]
