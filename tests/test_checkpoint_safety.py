"""Checkpoints nobody can use against you: nothing in one runs on --resume, a truncated or changed one is refused
naming the file, a full disk stops the run with the previous checkpoint intact, and two launches into one
output_dir cannot both run."""

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer
from safetensors.torch import load_file, save_file

from tether.cli import main
from tether.trainers import checkpoint as ckpt
from tether.trainers import statefile
from tether.trainers.lock import LOCK_FILE, hold_output_dir, launched_as_main


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 3-step run checkpointed at every step (its metrics are the uninterrupted reference), and its flags."""
    root = tmp_path_factory.mktemp("safety")
    tok = make_tokenizer()
    make_model(len(tok)).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie was", "i really", "a", "we"]))
    flags = ["ppo", "--model", str(root / "tiny"), "--prompts", str(prompts), "--reward",
             "rewards_for_tests:count_good", "--batch_size", "4", "--minibatch_size", "2", "--max_new_tokens", "5",
             "--checkpoint_every", "1", "--keep_checkpoints", "3", "--seed", "5", "--resume", "auto"]
    assert main(flags + ["--steps", "3", "--output_dir", str(root / "straight")]) == 0
    return root, flags


def run_at_step_2(base, tmp_path) -> Path:
    """A copy of the reference run as it was after step 2 (its step-3 checkpoint and log line dropped)."""
    root, _ = base
    run = tmp_path / "run"
    shutil.copytree(root / "straight", run)
    shutil.rmtree(run / "checkpoints" / "step-00000003")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2]))
    return run


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


def assert_same_metrics(run: Path, reference: Path) -> None:
    a, b = metrics(reference), metrics(run)
    assert [m["step"] for m in b] == [m["step"] for m in a]
    for x, y in zip(a, b):
        assert y == pytest.approx(x, abs=1e-6, nan_ok=True), x["step"]


class Payload:
    """Unpickling this writes a file: proof that the loader ran code from the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


# ---- nothing in a checkpoint runs ------------------------------------------------------------------------

def test_a_checkpoint_holds_no_pickle(base):
    root, _ = base
    folder = root / "straight" / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in folder.iterdir()) == ["policy.safetensors", "state.json", "state.safetensors"]
    body = json.loads((folder / "state.json").read_text())
    assert body["format"] == statefile.FORMAT and body["state"]["step"] == 3
    for name in ("policy.safetensors", "state.safetensors"):
        load_file(folder / name)  # plain safetensors
    state = ckpt.read_state(folder)
    assert isinstance(state["rng"]["python"], tuple) and isinstance(state["rng"]["python"][1], tuple)
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])  # parameter ids as torch saved them


@pytest.mark.parametrize("planted", ["trainer_state.pt", "state.json", "state.safetensors", "policy.safetensors"])
def test_a_pickle_payload_planted_in_a_checkpoint_is_refused_without_running(base, tmp_path, capsys, planted):
    root, flags = base
    run = run_at_step_2(base, tmp_path)
    folder = run / "checkpoints" / "step-00000002"
    marker = tmp_path / "pwned"
    state = ckpt.read_state(folder)
    state["step"] = Payload(marker)
    if planted == "trainer_state.pt":  # the layout tether 0.1.0 wrote: one pickle
        for name in ("state.json", "state.safetensors"):
            (folder / name).unlink()
        torch.save(state, folder / planted)
    else:
        (folder / planted).write_bytes(pickle.dumps(state))
    with open(folder / planted, "rb") as f:  # the payload is live: an unpickling loader runs it
        torch.load(f, weights_only=False) if planted == "trainer_state.pt" else pickle.load(f)
    assert marker.read_text() == "pwned"
    marker.unlink()

    assert main(flags + ["--steps", "3", "--output_dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume: {folder / planted}" in err, err
    assert not marker.exists()
    assert [m["step"] for m in metrics(run)] == [1, 2]  # refused before any training step


def test_a_checkpoint_in_the_old_pickle_layout_still_resumes(base, tmp_path):
    """tether 0.1.0's trainer_state.pt is read by torch's weights-only unpickler and resumes exactly."""
    root, flags = base
    run = run_at_step_2(base, tmp_path)
    folder = run / "checkpoints" / "step-00000002"
    state = ckpt.read_state(folder)
    for name in ("state.json", "state.safetensors"):
        (folder / name).unlink()
    torch.save(state, folder / statefile.LEGACY_STATE)  # numpy RNG state, tuples and all, as 0.1.0 saved it
    assert main(flags + ["--steps", "3", "--output_dir", str(run)]) == 0
    assert_same_metrics(run, root / "straight")


# ---- truncated or changed checkpoints --------------------------------------------------------------------

def _delete(folder, name):
    (folder / name).unlink()


def _truncate(folder, name):
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[:len(data) // 2])


def _reshape_a_weight(folder, name):
    tensors = load_file(folder / name)
    key = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, folder / name)


def _drop_a_weight(folder, name):
    tensors = load_file(folder / name)
    del tensors[sorted(tensors)[-1]]
    save_file(tensors, folder / name)


def _reshape_an_optimiser_moment(folder, name):
    body = json.loads((folder / "state.json").read_text())
    moment = body["state"]["optimizer"]["state"]["$dict"][0][1]["exp_avg"]["$tensor"]
    tensors = load_file(folder / "state.safetensors")
    tensors[moment] = torch.zeros(3, 3)
    save_file(tensors, folder / "state.safetensors")


def _change_the_config(folder, name):
    body = json.loads((folder / name).read_text())
    body["state"]["config"]["gamma"] = 0.5
    (folder / name).write_text(json.dumps(body))


def _break_the_rng(folder, name):
    body = json.loads((folder / name).read_text())
    body["state"]["rng"]["python"] = {"$tuple": [3, {"$tuple": [1, 2]}, None]}
    (folder / name).write_text(json.dumps(body))


@pytest.mark.parametrize("change, name, message", [
    (_delete, "policy.safetensors", "is missing"),
    (_delete, "state.safetensors", "is missing"),
    (_delete, "state.json", "is missing"),
    (_truncate, "policy.safetensors", "cannot be read"),
    (_truncate, "state.json", "is not valid JSON"),
    (_reshape_a_weight, "policy.safetensors", "of shape"),
    (_drop_a_weight, "policy.safetensors", "lacks 1 of the model's tensors"),
    (_reshape_an_optimiser_moment, "state.json", "has shape [3, 3]"),
    (_change_the_config, "state.json", "gamma: 0.5 -> 1.0"),
    (_break_the_rng, "state.json", "rng state this trainer cannot load"),
])
def test_a_truncated_or_changed_checkpoint_is_refused_naming_the_file(base, tmp_path, capsys, change, name, message):
    _, flags = base
    run = run_at_step_2(base, tmp_path)
    folder = run / "checkpoints" / "step-00000002"
    weights = load_file(run / "checkpoints" / "step-00000001" / "policy.safetensors")
    change(folder, name)
    assert main(flags + ["--steps", "3", "--output_dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume: {folder / name}" in err or f"({folder / name})" in err, err
    assert message in err, err
    assert [m["step"] for m in metrics(run)] == [1, 2]  # before any training step
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-00000001", "step-00000002"]
    for k, v in load_file(run / "checkpoints" / "step-00000001" / "policy.safetensors").items():
        assert torch.equal(v, weights[k])


# ---- a full disk ------------------------------------------------------------------------------------------

def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_stops(base, tmp_path, capsys,
                                                                                  monkeypatch):
    root, flags = base
    run = run_at_step_2(base, tmp_path)

    def disk_full(folder, state):  # half of the file is written, then the disk is full
        (folder / statefile.STATE_TENSORS).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / statefile.STATE_TENSORS))

    monkeypatch.setattr(ckpt, "write_state", disk_full)
    assert main(flags + ["--steps", "3", "--output_dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "no space left on the device" in err, err
    assert "It needs about" in err and "MiB" in err and "is free on that disk" in err, err
    assert f"the previous checkpoint {run / 'checkpoints' / 'step-00000002'} is complete" in err, err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001", "step-00000002"]  # no partial one
    ckpt.read_state(run / "checkpoints" / "step-00000002")
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]  # every line readable

    monkeypatch.setattr(ckpt, "write_state", statefile.write_state)  # space freed: resume from step 2
    assert main(flags + ["--steps", "3", "--output_dir", str(run)]) == 0
    assert_same_metrics(run, root / "straight")


def test_the_space_a_checkpoint_needs_is_its_tensors(tmp_path):
    module = torch.nn.Linear(100, 50)
    error = ckpt.write_failed(tmp_path, 7, tmp_path / "absent", OSError(errno.ENOSPC, "full"),
                              ckpt._tensor_bytes(module.state_dict()) + ckpt._tensor_bytes({"a": [torch.zeros(2**18)]}))
    assert f"It needs about {(5050 * 4 + 2**20) / 2**20:.1f} MiB" in str(error)
    assert "no earlier checkpoint exists" in str(error)


# ---- one run per output_dir -------------------------------------------------------------------------------

def _holder(output_dir: Path) -> subprocess.Popen:
    """Another process that holds output_dir's lock until it is killed."""
    code = ("import sys, time; from tether.trainers.lock import hold_output_dir\n"
            f"with hold_output_dir({str(output_dir)!r}):\n    print('held', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_launch_into_one_output_dir_is_refused_with_the_holders_pid(tmp_path, capsys):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        # /nope would be the error if the model were reached: the lock is checked before anything loads
        assert main(["ppo", "--model", "/nope", "--output_dir", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another tether run (pid {proc.pid} on" in err, err
        with pytest.raises(ValueError, match=f"pid {proc.pid}"):
            with hold_output_dir(run):
                pass
        with hold_output_dir(run, main=False):  # another rank of a launch takes no lock: never locked out
            pass
    finally:
        proc.kill()
        proc.wait()
    assert f"pid {proc.pid}" in (run / LOCK_FILE).read_text()  # the dead holder's pid is still in the file ...
    with hold_output_dir(run):  # ... and blocks nothing: the kernel dropped its flock at the kill
        with hold_output_dir(run):  # re-entrant within a process (the CLI, then train())
            assert f"pid {os.getpid()}" in (run / LOCK_FILE).read_text()
    with hold_output_dir(run):  # released after the outermost block
        pass


def test_only_the_main_rank_of_a_launch_takes_the_lock(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert launched_as_main()
    monkeypatch.setenv("RANK", "1")
    assert not launched_as_main()
    monkeypatch.setenv("RANK", "0")
    assert launched_as_main()


def test_a_lock_left_by_a_killed_run_does_not_block_its_resume(base, tmp_path):
    root, flags = base
    run = run_at_step_2(base, tmp_path)
    proc = _holder(run)
    proc.kill()  # a run killed with SIGKILL while it held the lock
    proc.wait()
    assert main(flags + ["--steps", "3", "--output_dir", str(run)]) == 0
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
