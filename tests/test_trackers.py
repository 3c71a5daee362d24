"""report_to: the real TensorBoard, W&B (offline) and MLflow (file store) get every step's metrics, read back
from what they wrote; a tracker that breaks mid-run is dropped with one warning; bad names are refused early."""

import glob
import json
import struct
import warnings

import pytest
import yaml
from conftest import make_model, make_tokenizer
from rewards_for_tests import count_good

from tether import PPOConfig, PPOTrainer
from tether.report import trackers

STEPS = 3
PROMPTS = ["the movie was", "i really", "a story", "we"]


def run(tmp_path, name: str, **keys) -> "Path":
    tok = make_tokenizer()
    config = PPOConfig(output_dir=str(tmp_path / name), steps=STEPS, batch_size=4, minibatch_size=2, ppo_epochs=1,
                       max_new_tokens=4, learning_rate=3e-3, seed=1, **keys)
    PPOTrainer(config, model=make_model(len(tok)), tokenizer=tok, prompts=PROMPTS, reward=count_good).train()
    return tmp_path / name


def logged(run_dir) -> dict[int, dict[str, float]]:
    """metrics.jsonl: step -> the finite metrics of that step (nulls are what trackers skip)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k != "step" and v is not None} for r in rows}


def assert_same(expected: dict[int, dict], got: dict[int, dict], what: str, rel: float = 0.0) -> None:
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1)), what
    for step, metrics in expected.items():
        assert set(got[step]) == set(metrics), (what, step, set(metrics) ^ set(got[step]))
        for key, value in metrics.items():
            assert got[step][key] == pytest.approx(value, rel=rel, abs=1e-7), (what, step, key)


def tensorboard_scalars(log_dir) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            out.setdefault(event.step, {})[tag] = event.value
    return out


def wandb_history(run_dir) -> tuple[dict[int, dict[str, float]], dict]:
    """The history rows and config of the offline run, read from its .wandb file: a LevelDB-style log (a 7-byte
    file header, then in 32 KiB blocks records of crc32 / length / type + a protobuf `Record`)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    position, block, pending, records = 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # the block's tail is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    history, config = {}, {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif record.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    return history, config


def test_tensorboard_wandb_and_mlflow_each_get_every_step(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks before using its file store
    uri = (tmp_path / "mlruns").as_uri()
    out = run(tmp_path, "run", report_to=["tensorboard", "wandb", "mlflow"], tracker_project="tether-test",
              run_name="baseline", tracker_tags=["tiny"], mlflow_tracking_uri=uri)
    expected = logged(out)
    assert "env/reward_mean" in expected[1] and "ppo/loss/policy" in expected[STEPS]

    assert_same(expected, tensorboard_scalars(out / "tb"), "tensorboard", rel=1e-6)  # float32 events

    history, config = wandb_history(out)
    assert_same(expected, history, "wandb")
    assert config["batch_size"] == 4 and config["report_to"] == ["tensorboard", "wandb", "mlflow"]

    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "tether-test"]
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == "baseline" and mlrun.data.tags["tiny"] == "true"
    assert mlrun.data.params["batch_size"] == "4" and mlrun.data.params["seed"] == "1"
    got = {}
    for key in mlrun.data.metrics:
        for m in client.get_metric_history(mlrun.info.run_id, key):
            got.setdefault(m.step, {})[key] = m.value
    assert_same(expected, got, "mlflow")
    assert mlrun.info.status == "FINISHED"


def test_a_tracker_that_breaks_mid_run_is_dropped_with_one_warning(tmp_path, monkeypatch):
    from accelerate.tracking import TensorBoardTracker

    original, calls = TensorBoardTracker.log, []

    def full_disk(self, values, step=None, **kwargs):
        calls.append(step)
        if step >= 2:
            raise OSError(28, "No space left on device")
        return original(self, values, step=step, **kwargs)

    monkeypatch.setattr(TensorBoardTracker, "log", full_disk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(tmp_path, "run", report_to=["tensorboard"])
    ours = [w for w in caught if "report_to" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "tensorboard failed at step 2" in str(ours[0].message) and "No space left" in str(ours[0].message)
    assert calls == [1, 2]  # dropped after the failure: never called again
    assert sorted(logged(out)) == list(range(1, STEPS + 1))  # metrics.jsonl complete
    assert (out / "policy" / "config.json").is_file() and (out / "report" / "report.html").is_file()
    assert sorted(tensorboard_scalars(out / "tb")) == [1]


def test_report_to_none_writes_no_tracker_files(tmp_path):
    out = run(tmp_path, "run", report_to=["none"])
    assert not (out / "tb").exists() and not (out / "wandb").exists()
    assert sorted(logged(out)) == list(range(1, STEPS + 1))
    assert yaml.safe_load((out / "config.yaml").read_text())["report_to"] == ["none"]


def test_bad_report_to_is_refused_when_the_config_is_built(monkeypatch):
    with pytest.raises(ValueError) as error:
        PPOConfig(report_to=["tensorbord", "none"], tracker_tags=[""])
    text = str(error.value)
    assert "unknown tracker 'tensorbord'" in text and "`none` cannot be combined" in text and "tracker_tags" in text
    monkeypatch.setitem(trackers.TRACKERS, "wandb", trackers.TrackerKind(
        "tether_no_such_module", "wandb", trackers.TRACKERS["wandb"].make, False))
    with pytest.raises(ValueError, match=r"wandb is not installed; install it with: pip install wandb"):
        PPOConfig(report_to=["wandb"])


def test_a_tracker_that_cannot_start_stops_the_run_before_it_trains(tmp_path, monkeypatch):
    def refuse(settings):
        raise ConnectionError("server at http://nowhere:5000 is not answering")

    monkeypatch.setitem(trackers.TRACKERS, "mlflow", trackers.TrackerKind("json", "mlflow-skinny", refuse, True))
    with pytest.raises(trackers.TrackerError, match="mlflow could not start.*not answering"):
        run(tmp_path, "run", report_to=["tensorboard", "mlflow"])
    assert not (tmp_path / "run" / "metrics.jsonl").read_text()  # no step ran


def test_tether_reward_feeds_the_trackers_too(tmp_path):
    from test_reward_trainer import synthetic_pairs, tiny_reward_model

    from tether.reward_config import RewardConfig
    from tether.trainers.reward import RewardTrainer

    tok = make_tokenizer()
    config = RewardConfig(output_dir=str(tmp_path / "rm"), epochs=1, batch_size=16, max_length=32, eval_every=2,
                          report_to=["tensorboard"])
    RewardTrainer(config, model=tiny_reward_model(tok), tokenizer=tok, data=synthetic_pairs(48, 0),
                  eval_data=synthetic_pairs(16, 1)).train()
    expected: dict[int, dict] = {}
    for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        expected.setdefault(row.pop("step"), {}).update({k: v for k, v in row.items() if v is not None})
    got = tensorboard_scalars(tmp_path / "rm" / "tb")
    assert sorted(got) == sorted(expected) == [1, 2, 3] and "eval/accuracy" in got[2]
    for step, metrics in expected.items():
        assert got[step] == pytest.approx(metrics, rel=1e-6, abs=1e-7), step
