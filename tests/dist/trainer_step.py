"""Run by tests/test_distributed_trainer.py under `accelerate launch` (2 processes) and imported by it (1 process):
the same rollouts, split by rank, through one trainer step per configuration."""

import itertools
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_model, make_tokenizer  # noqa: E402

from tether import PPOConfig  # noqa: E402
from tether.trainers import trainer_class  # noqa: E402

B = 8
CONFIGS = {
    "ppo": {"algorithm": "ppo", "whiten_rewards": True, "score_norm": True},
    "grpo": {"algorithm": "grpo", "num_generations": 2, "kl_in_loss": True, "init_kl_coef": 0.3},
    # unclipped: DeepSpeed clips the policy and a separate critic together (one norm), tether apart
    "ppo_lora_critic": {"algorithm": "ppo", "lora_r": 2, "critic": "policy", "gradient_checkpointing": True,
                        "max_grad_norm": 0.0},
}
# the loss menu: the aggregations normalise over every process's rows, batch scaling takes the global std
CONFIGS["grpo_gspo"] = {**CONFIGS["grpo"], "loss_aggregation": "sequence_mean", "scale_rewards": "batch",
                        "importance_ratio": "sequence", "cliprange": 0.1, "logits_chunk_rows": 3}
CONFIGS["grpo_drgrpo"] = {**CONFIGS["grpo"], "loss_aggregation": "sequence_sum_norm", "scale_rewards": "none",
                          "policy_loss": "cispo", "overlong": "mask", "entropy_coef": 0.01}
CONFIGS["ppo_critic"] = {**CONFIGS["ppo_lora_critic"], "lora_r": 0}  # LoRA is refused on ZeRO-3
# the vocabulary in blocks of 3 positions, each recomputed in the backward pass (where FSDP must still hold the LM
# head gathered); ZeRO-3 refuses explicit blocks (assemble.logits_block_rows)
CONFIGS["ppo_critic_blocks"] = {**CONFIGS["ppo_critic"], "logits_chunk_rows": 3}
CONFIGS["ppo_compile"] = {**CONFIGS["ppo"], "compile": True}
# compile: with whole parameters only (ZeRO-3 and FSDP are refused)
CASES = {"ddp": ["grpo", "grpo_drgrpo", "grpo_gspo", "ppo", "ppo_compile", "ppo_lora_critic"],
         "zero2": ["grpo", "ppo", "ppo_compile", "ppo_lora_critic"],
         "zero3": ["grpo", "ppo", "ppo_critic"], "fsdp": ["grpo", "ppo", "ppo_critic_blocks"]}


def rollouts(tok):
    """B fixed rollouts: prompts in pairs (for groups of 2), responses of different lengths, some ending in EOS."""
    g = torch.Generator().manual_seed(0)
    prompts = ["the movie was", "i really", "a story", "the actor and"]
    queries = [torch.tensor(tok(prompts[i // 2])["input_ids"]) for i in range(B)]
    responses = []
    for i in range(B):
        n = 3 + i % 4
        r = torch.randint(3, len(tok), (n,), generator=g)
        if i % 3 == 0:
            r[-1] = tok.eos_token_id
        responses.append(r)
    scores = torch.randn(B, generator=g).tolist()
    return queries, responses, scores


@contextmanager
def poisoned(trainer, rank: int, num: int, first: bool):
    """Every update's first (or second) micro-batch gets a nan loss on the last process only: every update must
    then be skipped on all processes, and gradients already accumulated (by the first) dropped."""
    from tether.trainers import optimise

    calls = itertools.count()
    micro_loss = optimise.micro_loss

    def nan_loss(*args):
        loss, parts = micro_loss(*args)
        return (loss * float("nan") if next(calls) % 2 == (0 if first else 1) and rank == num - 1 else loss), parts

    optimise.micro_loss = nan_loss
    try:
        yield
    finally:
        optimise.micro_loss = micro_loss


@contextmanager
def ratio_threshold(trainer, value: float):
    """A threshold every minibatch's mean ratio exceeds (below the config's own check of > 1)."""
    old = trainer.config.ratio_threshold
    object.__setattr__(trainer.config, "ratio_threshold", value)
    try:
        yield
    finally:
        object.__setattr__(trainer.config, "ratio_threshold", old)


def run(name: str, out: Path, rank: int, num: int) -> dict:
    """Skipped updates (a nan loss, a ratio over the threshold) must leave the weights as they are; the step
    after them is compared with one process's; then a nan score on one process skips the whole step."""
    tok = make_tokenizer()
    cfg = PPOConfig(batch_size=B, minibatch_size=B, ppo_epochs=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                    max_new_tokens=6, seed=0, output_dir=str(out / name), **CONFIGS[name])
    trainer = trainer_class(cfg.algorithm)(cfg, model=make_model(len(tok)), tokenizer=tok)
    queries, responses, scores = rollouts(tok)
    rows = slice(rank * B // num, (rank + 1) * B // num)

    def weights() -> dict:
        whole = trainer.ranks.full_state_dict(trainer.trainable)  # ZeRO-3, FSDP: on the main process only
        return whole if whole is not None else {k: v.detach().cpu().clone()
                                                for k, v in trainer.trainable.state_dict().items()}

    start = weights()
    faulted = {}
    for first in (True, False):
        with poisoned(trainer, rank, num, first):
            faulted[first] = trainer.step(queries[rows], responses[rows], scores[rows])
    with ratio_threshold(trainer, 0.5):
        over_ratio = trainer.step(queries[rows], responses[rows], scores[rows])
    skipped_updates_unchanged = all(torch.equal(start[k], v) for k, v in weights().items())
    stats = trainer.step(queries[rows], responses[rows], scores[rows])
    after = weights()
    nan_scores = list(scores)
    nan_scores[B - 1] = float("nan")  # on the last process only
    with torch.no_grad():
        skipped = trainer.step(queries[rows], responses[rows], nan_scores[rows])
    unchanged = all(torch.equal(after[k], v) for k, v in weights().items())
    forward = trainer.learner.trained_module
    return {"wrapper": type(getattr(forward, "_orig_mod", forward)).__name__,
            "compiled": isinstance(forward, torch._dynamo.eval_frame.OptimizedModule),
            "param_type": type(next(trainer.trainable.parameters())).__name__,
            "stats": stats, "weights": after, "skipped": skipped, "unchanged_after_skip": unchanged,
            "faulted": faulted, "over_ratio": over_ratio, "skipped_updates_unchanged": skipped_updates_unchanged}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    names = sys.argv[3:] or CASES[sys.argv[2]]  # python trainer_step.py OUT KIND [CONFIG ...]
    results = {name: run(name, out, int(os.environ["RANK"]), 2) for name in names}
    torch.save(results, out / f"rank{os.environ['RANK']}.pt")
    # Leave without running C++ static destructors: at interpreter exit after a DeepSpeed-on-CPU run, a rank has
    # aborted at times ("terminate called without an active exception": a thread still joinable when its owner
    # is destroyed), after every result was written. Both ranks' results are on disk once the barrier passes.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
