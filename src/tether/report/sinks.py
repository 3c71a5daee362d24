"""Metric sinks: where a run's numbers go, behind one two-method interface.

A sink has `log(metrics, step)` and `close()`. The trainer holds a list of
them and never asks which kind it has (composition, not a logger hierarchy).
`JsonlSink` writes the `metrics.jsonl` that `tether.report.build_report`
reads; `SamplesSink` writes `samples.jsonl`, what the model actually said.
TensorBoard, W&B, MLflow and Trackio are not written here: `trackers.py` feeds
them through Accelerate's tracker classes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Protocol


class MetricSink(Protocol):
    def log(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def to_number(value: Any, name: str = "value") -> float | None:
    """A plain float from a Python number, 0-d/1-element tensor or numpy scalar.

    Non-finite values become None because JSON has no NaN or Infinity
    (Python's `json` would write the bare token `NaN`, which strict parsers
    such as JavaScript's `JSON.parse` and `jq` reject).
    """
    if hasattr(value, "item"):  # torch.Tensor, numpy scalar or array; .item() also leaves the GPU
        try:
            value = value.item()
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"{name}: expected a single number, got shape {tuple(value.shape)}") from error
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class _JsonlFile:
    """An append-mode JSON-lines file, flushed per line so a crash loses at most one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonlSink(_JsonlFile):
    """`{"step": 3, "env/reward_mean": 0.41, ...}` per call; NaN and inf written as null."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step number; rename that metric")
        record = {"step": int(step)}
        record.update({key: to_number(value, key) for key, value in metrics.items()})
        self.write(record)


class SamplesSink(_JsonlFile):
    """One line per generated sample: {"step", "prompt", "completion", "score", "kl"}.

    `rows` are dicts with at least "prompt" and "completion"; "score" and "kl"
    may be missing (written as null), and extra keys are kept after them.
    """

    def log(self, rows: list[Mapping[str, Any]], step: int) -> None:
        for index, row in enumerate(rows):
            missing = {"prompt", "completion"} - row.keys()
            if missing:
                raise KeyError(f"sample row {index} at step {step} lacks {sorted(missing)}")
            record = {
                "step": int(step),
                "prompt": str(row["prompt"]),
                "completion": str(row["completion"]),
                "score": to_number(row.get("score"), "score"),
                "kl": to_number(row.get("kl"), "kl"),
            }
            for key, value in row.items():
                if key not in record:
                    record[key] = value if isinstance(value, str) else to_number(value, key)
            self.write(record)
