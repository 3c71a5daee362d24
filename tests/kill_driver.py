"""`python tests/kill_driver.py POINT N -- tether CLI args`: runs `tether.cli.main` and SIGKILLs its own process at
the N-th call of the function named by POINT, so that test_resume.py kills a run at a known place, whatever the
machine's speed:

  generate    RLTrainer.generate: while sampling a batch (the step's first stage)
  optimizer   right after an optimiser step has changed the weights (a step post-hook; before the scheduler's
              step and the step's metrics)
  checkpoint  a file write (torch.save, safetensors' save_file): while a checkpoint (or the final policy) is
              half-written

Nothing in tether is changed: the named functions are wrapped here, in this process only."""

import os
import signal
import sys


def kill_on_call(owner, name: str, n: int) -> None:
    real = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


def main() -> int:
    point, n, sep, *args = sys.argv[1:]
    assert sep == "--", sys.argv
    n = int(n)
    if point == "generate":
        from tether.trainers.base import RLTrainer

        kill_on_call(RLTrainer, "generate", n)
    elif point == "optimizer":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        calls = [0]

        def after_step(optimizer, args, kwargs):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)

        register_optimizer_step_post_hook(after_step)
    elif point == "checkpoint":
        import safetensors.torch
        import torch

        counter = [0]
        for owner, name in ((torch, "save"), (safetensors.torch, "save_file")):
            real = getattr(owner, name)

            def wrapper(*a, real=real, **kw):  # one count over both writers
                counter[0] += 1
                if counter[0] == n:
                    with open(a[1] if len(a) > 1 else kw.get("filename", kw.get("f")), "wb") as f:
                        f.write(b"half")  # a partly written file, then the kill
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*a, **kw)

            setattr(owner, name, wrapper)
    else:
        raise SystemExit(f"unknown point {point!r}")
    from tether.cli import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
