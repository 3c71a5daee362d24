"""One run per output_dir: while a run trains (or writes a checkpoint) its main process holds an exclusive
`flock` on OUTPUT_DIR/.tether.lock, and a second launch into the same folder is refused with the holder's pid.

A flock belongs to the open file, so the kernel drops it when the process ends in any way, kill -9 included:
a lock file left behind by a dead process blocks nothing, and no pid has to be checked for staleness (the pid
in the file is only for the message). Only the main process of a multi-process launch takes it, so the ranks
of one run never lock each other out. Within one process the lock is re-entrant (the CLI takes it before the
models load, `train()` and `save_checkpoint()` take it again).
"""

import os
import socket
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs are not locked
    fcntl = None

LOCK_FILE = ".tether.lock"
_held: dict[str, list] = {}  # real path of a lock file -> [open file, times taken in this process]


class OutputDirBusy(ValueError):
    """Another process is running in this output_dir."""


def launched_as_main() -> bool:
    """Whether this process is the main one of its launch (torchrun / `accelerate launch` set RANK), read
    before any process group exists."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def hold_output_dir(output_dir: str | Path, main: bool = True):
    """Hold output_dir's lock inside the block (nothing when not `main`); OutputDirBusy if another process does."""
    if not main or fcntl is None:
        yield
        return
    key = _acquire(Path(output_dir))
    try:
        yield
    finally:
        _release(key)


def _acquire(output_dir: Path) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(output_dir / LOCK_FILE)
    if key in _held:
        _held[key][1] += 1
        return key
    f = open(key, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown pid"
        f.close()
        raise OutputDirBusy(f"output_dir {str(output_dir)!r} is in use by another tether run ({holder}); two runs "
                            f"writing one folder would mix their checkpoints and logs. Wait for it to finish, stop "
                            f"it, or choose another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held[key] = [f, 1]
    return key


def _release(key: str) -> None:
    entry = _held[key]
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        entry[0].close()  # closing the file drops the flock; the file stays (unlinking it would race a waiter)
