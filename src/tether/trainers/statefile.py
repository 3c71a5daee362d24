"""A checkpoint's trainer state without pickle: its structure as JSON (`state.json`), every tensor in one
safetensors file (`state.safetensors`). Reading either runs no code from the files, so a checkpoint folder
someone hands you cannot run anything on `--resume`.

JSON has no tuples, no non-string keys and no arrays; they are written as one-key objects (`{"$tuple": [..]}`,
`{"$dict": [[key, value], ..]}`, `{"$ndarray": ..}`, `{"$tensor": name}`) so that the state reads back exactly
as it was saved (Python's `random.setstate` needs its tuple, the optimiser its integer parameter ids).

Checkpoints tether 0.1.0 wrote hold one pickle, `trainer_state.pt`. They are read with torch's weights-only
unpickler (tensors, containers and numbers only), allowing the three NumPy names the NumPy random state needs;
anything else in the file is refused without being run.
"""

import json

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tether import __version__

FORMAT = 2  # 1: trainer_state.pt (a pickle, tether 0.1.0); 2: state.json + state.safetensors
STATE_JSON, STATE_TENSORS, LEGACY_STATE = "state.json", "state.safetensors", "trainer_state.pt"
_MARKS = ("$tuple", "$dict", "$ndarray", "$tensor")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, truncated, changed or of an unknown layout."""


def encode(value, tensors: dict, where: str = "state"):
    """`value` as JSON-ready data; its tensors are moved into `tensors` (named t0, t1, ...)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()  # own storage: no shared tensors
        return {"$tensor": name}
    if isinstance(value, np.ndarray):
        return {"$ndarray": value.tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode(v, tensors, f"{where}[{k!r}]") for k, v in value.items()}
        return {"$dict": [[encode(k, tensors, where), encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()]}
    raise TypeError(f"cannot store {type(value).__name__} at {where} in a checkpoint (tensors, numbers, strings, "
                    f"lists, tuples and dicts only): give that part a state_dict of those")


def decode(data, tensors: dict):
    """The inverse of `encode`; KeyError for a tensor name the tensors file does not hold."""
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    mark = next((m for m in _MARKS if m in data), None)
    if mark == "$tensor":
        return tensors[data["$tensor"]]
    if mark == "$tuple":
        return tuple(decode(v, tensors) for v in data["$tuple"])
    if mark == "$dict":
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in data["$dict"]}
    if mark == "$ndarray":
        return np.array(data["$ndarray"], dtype=np.dtype(data["dtype"])).reshape(data["shape"])
    return {k: decode(v, tensors) for k, v in data.items()}


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


def state_bytes(state: dict) -> int:
    """Roughly how many bytes `write_state` writes for `state` (its tensors; the JSON is small)."""
    tensors: dict = {}
    text = json.dumps(encode(state, tensors))
    return len(text) + sum(t.numel() * t.element_size() for t in tensors.values())


def write_state(folder, state: dict) -> None:
    tensors: dict = {}
    body = {"format": FORMAT, "tether_version": __version__, "state": encode(state, tensors)}
    save_file(tensors, str(folder / STATE_TENSORS))
    with open(folder / STATE_JSON, "w") as f:
        json.dump(body, f)


def read_state(folder) -> dict:
    """The trainer state in checkpoint `folder`; CheckpointError naming the file when it cannot be read."""
    if not (folder / STATE_JSON).exists() and (folder / LEGACY_STATE).exists():
        return read_legacy_state(folder / LEGACY_STATE)
    for name in (STATE_JSON, STATE_TENSORS):
        if not (folder / name).is_file():
            raise CheckpointError(f"cannot resume: {folder / name} is missing (the checkpoint is incomplete); "
                                  f"remove {folder} to resume from the one before it")
    try:
        body = json.loads((folder / STATE_JSON).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot resume: {folder / STATE_JSON} is not valid JSON ({err}); the file is "
                              f"truncated or was changed") from err
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        got = body.get("format") if isinstance(body, dict) else None
        raise CheckpointError(f"cannot resume: {folder / STATE_JSON} has checkpoint format {got!r} (written by "
                              f"tether {body.get('tether_version', '?') if isinstance(body, dict) else '?'}); "
                              f"tether {__version__} reads format {FORMAT}")
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot resume: {folder / STATE_TENSORS} cannot be read ({err}); the file is "
                              f"truncated or was changed") from err
    try:
        state = decode(body["state"], tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"cannot resume: {folder / STATE_JSON} does not match {folder / STATE_TENSORS} "
                              f"({type(err).__name__}: {err}); one of them was changed") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot resume: {folder / STATE_JSON} holds no trainer state (a JSON object)")
    return state


def read_legacy_state(path) -> dict:
    """A tether 0.1.0 checkpoint's trainer_state.pt, through torch's weights-only unpickler: nothing in it runs."""
    reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
    # NumPy 1 pickles name it numpy.core.multiarray, NumPy 2 numpy._core.multiarray
    allowed = [np.ndarray, np.dtype, np.dtype(np.uint32).__class__, reconstruct,
               (reconstruct, "numpy.core.multiarray._reconstruct")]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # the weights-only unpickler raises UnpicklingError, zip errors RuntimeError, ...
        raise CheckpointError(f"cannot resume: {path} (a checkpoint in the pickle layout of tether 0.1.0) holds "
                              f"something besides tensors, numbers and containers, so tether refuses to load it "
                              f"(loading it could run code from it). tether wrote no such file: it is truncated, "
                              f"or it came from elsewhere. ({str(err).splitlines()[0][:300]})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot resume: {path} holds no trainer state (a dict)")
    return state
