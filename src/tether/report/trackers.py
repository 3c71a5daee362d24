"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, Trackio) through Accelerate's tracker classes.

`report_to` names them. Each is checked at config time (`tracker_errors`: a tracker that is not installed is
refused with the pip command, before any model loads), started by the main process only when the run logger
opens (`Trackers.start`, which hands it the run's config once), and fed every step's metrics. A tracker that
raises later (a full disk, a dead server) is dropped with one warning: training goes on, and the run folder's
own metrics.jsonl, written first and apart from the trackers, is never affected.

Accelerate's classes are used without an `Accelerator`: its tracking module logs through a logger that needs
accelerate's process state, so a one-process run gets a CPU `PartialState` (a launched run already has one,
owned by its `Accelerator`).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from tether.report.sinks import to_number


@dataclass(frozen=True)
class TrackerKind:
    module: str  # what must be importable
    pip: str  # what to install
    make: Callable[["Settings"], Any]  # -> an accelerate.tracking.GeneralTracker, not started
    flat_config: bool  # whether its hyperparameters must be scalars (lists and dicts sent as JSON text)


@dataclass(frozen=True)
class Settings:
    """What a tracker is told about the run: the flat config keys of the logging section."""

    run_dir: Path
    project: str
    run_name: str
    tags: tuple[str, ...]
    mlflow_tracking_uri: str | None
    start: int  # the step a resumed run continues after (0: a fresh run)


def tracker_settings(config, start: int = 0) -> Settings:
    """The Settings of a PPOConfig or RewardConfig (its output_dir and tracker keys)."""
    run_dir = Path(config.output_dir)
    return Settings(run_dir, config.tracker_project, config.run_name or run_dir.resolve().name,
                    tuple(config.tracker_tags), config.mlflow_tracking_uri, start)


def _tensorboard(s: Settings):
    from accelerate.tracking import TensorBoardTracker

    # Events straight into RUN/tb (run_name ""). flush_secs: SummaryWriter's default (120 s) is too slow to
    # watch a short CPU run live; purge_step: a resumed run hides events a killed process wrote after its
    # checkpoint.
    return TensorBoardTracker("", s.run_dir / "tb", flush_secs=10, purge_step=s.start + 1 if s.start else None)


def _wandb(s: Settings):
    from accelerate.tracking import WandBTracker

    # dir: the wandb/ folder (offline runs, logs) goes into the run folder, not the working directory
    return WandBTracker(s.project, name=s.run_name, tags=list(s.tags) or None, dir=str(s.run_dir))


def _mlflow(s: Settings):
    import mlflow
    from accelerate.tracking import MLflowTracker

    if s.mlflow_tracking_uri:
        mlflow.set_tracking_uri(s.mlflow_tracking_uri)
    return MLflowTracker(experiment_name=s.project, run_name=s.run_name, tags={t: "true" for t in s.tags} or None)


def _trackio(s: Settings):
    from accelerate.tracking import TrackioTracker

    return TrackioTracker(s.project, name=s.run_name)


TRACKERS: dict[str, TrackerKind] = {
    "tensorboard": TrackerKind("tensorboard", "tensorboard", _tensorboard, flat_config=True),
    "wandb": TrackerKind("wandb", "wandb", _wandb, flat_config=False),
    "mlflow": TrackerKind("mlflow", "mlflow-skinny", _mlflow, flat_config=True),
    "trackio": TrackerKind("trackio", "trackio", _trackio, flat_config=False),
}


def tracker_errors(report_to) -> list[str]:
    """Config-time problems with `report_to`: unknown names, `none` with others, repeats, trackers not installed."""
    if not isinstance(report_to, (list, tuple)) or not all(isinstance(n, str) for n in report_to):
        return [f"report_to={report_to!r} must be a list of tracker names ({', '.join(TRACKERS)}) or [none]"]
    problems = []
    if "none" in report_to and len(report_to) > 1:
        problems.append(f"report_to={list(report_to)!r}: `none` cannot be combined with other trackers")
    for name in sorted({n for n in report_to if report_to.count(n) > 1}):
        problems.append(f"report_to names {name!r} more than once")
    for name in dict.fromkeys(report_to):
        if name == "none":
            continue
        kind = TRACKERS.get(name)
        if kind is None:
            problems.append(f"report_to: unknown tracker {name!r}; choose from {sorted(TRACKERS)} or none")
        elif importlib.util.find_spec(kind.module) is None:
            problems.append(f"report_to: {name} is not installed; install it with: pip install {kind.pip}  "
                            f"(or: pip install 'tether[{name}]')")
    return problems


class TrackerError(RuntimeError):
    """A tracker named in report_to could not start (a tracker that fails later is only dropped)."""


def _flat(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


class Trackers:
    """Every tracker of `report_to`, started; a metric sink (`log`, `close`) like the run folder's files."""

    def __init__(self, started: list[tuple[str, Any]]) -> None:
        self._trackers = started

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._trackers]

    @classmethod
    def start(cls, report_to, settings: Settings, config: Mapping[str, Any]) -> "Trackers":
        """Start each tracker and store `config` in it once; a tracker that fails here stops the run before it
        trains, naming the tracker (the ones already started are closed)."""
        names = [n for n in report_to if n != "none"]
        if not names:
            return cls([])
        from accelerate import PartialState

        PartialState(cpu=True)  # one process: the state accelerate's tracking logger needs; launched: the existing
        started: list[tuple[str, Any]] = []
        for name in names:
            kind = TRACKERS[name]
            try:
                tracker = kind.make(settings)
                tracker.start()
                tracker.store_init_configuration({k: _flat(v) for k, v in config.items()} if kind.flat_config
                                                 else dict(config))
            except Exception as error:
                cls(started).close()
                raise TrackerError(f"report_to: {name} could not start ({type(error).__name__}: {error}); fix it "
                                   f"or leave {name} out of report_to") from error
            started.append((name, tracker))
        return cls(started)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        # finite numbers only, as metrics.jsonl writes NaN/inf as null
        values = {k: v for k, v in ((k, to_number(v, k)) for k, v in metrics.items()) if v is not None}
        for name, tracker in list(self._trackers):
            try:
                tracker.log(values, step=int(step))
            except Exception as error:
                self._drop(name, tracker, f"failed at step {step}", error)

    def close(self) -> None:
        for name, tracker in list(self._trackers):
            try:
                tracker.finish()
            except Exception as error:
                warnings.warn(f"report_to: {name} failed to close ({type(error).__name__}: {error}); what it "
                              f"received may be incomplete. metrics.jsonl in the run folder is complete",
                              RuntimeWarning, stacklevel=2)
        self._trackers = []

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _drop(self, name: str, tracker, when: str, error: Exception) -> None:
        self._trackers = [(n, t) for n, t in self._trackers if t is not tracker]
        warnings.warn(f"report_to: {name} {when} ({type(error).__name__}: {error}) and is dropped for the rest of "
                      f"the run; training goes on and metrics.jsonl in the run folder stays complete",
                      RuntimeWarning, stacklevel=3)
        try:
            tracker.finish()
        except Exception:  # already broken; the warning above said so
            pass
