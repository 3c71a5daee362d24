"""The run folder and the console: resolved config, metrics, samples, the experiment trackers, a progress bar."""

import json
import math
import os
import shutil
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from tether.report.sinks import JsonlSink, SamplesSink
from tether.report.trackers import Trackers, tracker_settings


class RunLogger:
    def __init__(self, config, total: int, start: int = 0) -> None:
        """start: the step a resumed run continues after (0 for a fresh run)."""
        self.config = config
        self.dir = Path(config.output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        for name in ("metrics.jsonl", "samples.jsonl"):  # a fresh run never mixes with an old one; a resumed
            keep_steps_up_to(self.dir / name, start)  # one drops what a killed process logged after its checkpoint
        if start == 0:
            shutil.rmtree(self.dir / "tb", ignore_errors=True)
        # metrics.jsonl first: the trackers come after it, and one that fails is dropped without touching it
        self.sinks = [JsonlSink(self.dir / "metrics.jsonl")]
        self.samples = SamplesSink(self.dir / "samples.jsonl")
        self.bar = tqdm(total=total, initial=start, desc=config.algorithm, unit="step", dynamic_ncols=True)
        try:
            self.sinks.append(Trackers.start(config.report_to, tracker_settings(config, start), config.to_dict()))
        except BaseException:
            self.__exit__()
            raise

    def log(self, step: int, stats: dict, prompts, completions, scores, kl_per_seq) -> None:
        for sink in self.sinks:
            sink.log(stats, step)
        every, n = self.config.samples_every, self.config.samples_per_step
        if every and (step % every == 0 or step == 1):
            rows = [{"prompt": p, "completion": c, "score": float(s), "kl": float(k)}
                    for p, c, s, k in list(zip(prompts, completions, [float(x) for x in scores], kl_per_seq))[:n]]
            self.samples.log(rows, step)
        self.bar.set_postfix(reward=f"{stats['env/reward_mean']:.3f}", kl=f"{stats['objective/kl']:.3f}",
                             tok_s=f"{stats.get('throughput/tokens_per_s', math.nan):.0f}")
        self.bar.update(1)

    def record(self, step: int, stats: dict) -> None:
        """Metrics alone (the held-out evaluation before the first step); nothing when `stats` is empty."""
        for sink in self.sinks if stats else ():
            sink.log(stats, step)

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        for sink in self.sinks + [self.samples]:
            sink.close()


def keep_steps_up_to(path: Path, step: int) -> None:
    """Rewrite a JSONL log keeping only records with "step" <= step (atomically: temp file, then rename)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a kill mid-write


class NoLog:
    """The run logger of a process other than the main one."""

    def log(self, *args) -> None:
        pass

    def record(self, *args) -> None:
        pass
