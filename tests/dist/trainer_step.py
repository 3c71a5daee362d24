"""Run by tests/test_distributed_trainer.py under `accelerate launch` (2 processes) and imported by it (1 process):
the same rollouts, split by rank, through one trainer step per configuration."""

import sys
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
    "ppo_lora_critic": {"algorithm": "ppo", "lora_r": 2, "critic": "policy", "gradient_checkpointing": True},
}


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


def run(name: str, out: Path, rank: int, num: int) -> dict:
    tok = make_tokenizer()
    cfg = PPOConfig(batch_size=B, minibatch_size=B, ppo_epochs=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                    max_new_tokens=6, seed=0, output_dir=str(out / name), **CONFIGS[name])
    trainer = trainer_class(cfg.algorithm)(cfg, model=make_model(len(tok)), tokenizer=tok)
    queries, responses, scores = rollouts(tok)
    rows = slice(rank * B // num, (rank + 1) * B // num)
    stats = trainer.step(queries[rows], responses[rows], scores[rows])
    weights = {k: v.detach().cpu().clone() for k, v in trainer.trainable.state_dict().items()}
    nan_scores = list(scores)
    nan_scores[B - 1] = float("nan")  # on the last process only
    with torch.no_grad():
        skipped = trainer.step(queries[rows], responses[rows], nan_scores[rows])
    unchanged = all(torch.equal(weights[k], v.detach().cpu()) for k, v in trainer.trainable.state_dict().items())
    return {"stats": stats, "weights": weights, "skipped": skipped, "unchanged_after_skip": unchanged}


if __name__ == "__main__":
    from accelerate import PartialState

    out = Path(sys.argv[1])
    results = {name: run(name, out, int(__import__("os").environ["RANK"]), 2) for name in CONFIGS}
    state = PartialState()
    results["distributed_type"] = str(state.distributed_type)
    torch.save(results, out / f"rank{state.process_index}.pt")
