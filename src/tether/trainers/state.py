"""Trainer state that checkpoints, as parts that save and load themselves (`state_dict` / `load_state_dict`):
the run's progress (step counter, data order) and every random generator a step draws from."""

import random

import numpy as np
import torch


class Progress:
    """Where the run is: steps done, the prompt order left in this pass over the data, and a count of sampled
    tokens that replay put outside the sampler's support by round-off (rollout/support_flips)."""

    def __init__(self, data_generator: torch.Generator) -> None:
        self.step = 0
        self.support_flips = 0
        self.order: list[int] = []  # prompt indices still to visit in this pass
        self.data_generator = data_generator

    def next_prompts(self, n: int, num_prompts: int) -> list[int]:
        """n prompt indices: a seeded shuffle, reshuffled on each pass over the data."""
        while len(self.order) < n:
            self.order += torch.randperm(num_prompts, generator=self.data_generator).tolist()
        indices, self.order = self.order[:n], self.order[n:]
        return indices

    def state_dict(self) -> dict:
        return {"step": self.step, "support_flips": self.support_flips, "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.support_flips, self.order = state["step"], state["support_flips"], list(state["order"])


class RandomState:
    """The global generators (Python, NumPy, torch, CUDA) and the trainer's own: sampling, minibatch shuffling,
    prompt order. Each process has its own (sampling is seeded per process)."""

    def __init__(self, sample: torch.Generator, shuffle: torch.Generator, data: torch.Generator) -> None:
        self.generators = {"sample": sample, "shuffle": shuffle, "data": data}

    def state_dict(self) -> dict:
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                **{name: g.get_state() for name, g in self.generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        for name, g in self.generators.items():
            g.set_state(state[name])
