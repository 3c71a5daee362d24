"""Padding before and after: one workload with prompts and responses of mixed lengths (EOS enabled), trained with
tether's length-grouped, cut micro-batches and, in the same run, with every micro-batch padded like the whole
batch (the old way, patched in). Prints the padding share of the update's forward passes and the step time.

    .venv/bin/python bench/padding.py [--steps 4] [--threads 2]
"""

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from tether import PPOConfig
from tether.trainers import trainer_class

VOCAB = 512
EOS = 0


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<eos>": EOS, "<unk>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=4, n_embd=256, n_head=4, n_positions=256,
                                   bos_token_id=EOS, eos_token_id=EOS)).eval()
    with torch.no_grad():  # EOS about 1 in 25 per token: responses from a few tokens to max_new_tokens
        m.lm_head.weight[EOS] = 0.0
        m.transformer.ln_f.bias.zero_()
        m.transformer.ln_f.bias[0] = 1.0
        m.lm_head.weight[EOS, 0] = 3.0
    return m


@contextlib.contextmanager
def padded_like_the_batch():
    """tether before the cut: rows in their minibatch order, every micro-batch at the batch's widths."""
    import tether.trainers.optimise as optimise
    import tether.trainers.scoring as scoring
    from tether.rollout.batch import Rollouts

    saved = optimise.length_order, scoring.length_order, scoring.padding_bounds, Rollouts.trimmed
    in_order = lambda q, r: torch.arange(len(q), device=q.device)  # noqa: E731
    optimise.length_order = scoring.length_order = in_order
    scoring.padding_bounds = lambda q, r: (0, r.shape[1])
    Rollouts.trimmed = lambda self: self
    try:
        yield
    finally:
        optimise.length_order, scoring.length_order, scoring.padding_bounds, Rollouts.trimmed = saved


def run(name: str, steps: int, out: Path) -> dict:
    tok = tokenizer()
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (int(n),), generator=g))
               for n in torch.randint(4, 49, (64,), generator=g)]
    cfg = PPOConfig(batch_size=32, minibatch_size=16, gradient_accumulation_steps=4, ppo_epochs=2, max_new_tokens=48,
                    learning_rate=1e-5, seed=0, device="cpu", output_dir=str(out / name), report_to=["none"])
    trainer = trainer_class("ppo")(cfg, model=model(), tokenizer=tok)
    times, shares, whole = [], [], []
    for step in range(steps + 1):  # the first is a warm-up
        gen = trainer.generate(prompts[(step * 32) % 64:][:32])
        scores = [len(r) / 48 for r in gen.responses]
        t0 = time.perf_counter()
        stats = trainer.step(gen.queries, gen.responses, scores)
        if step:
            times.append(time.perf_counter() - t0)
            shares.append(stats["throughput/padding_share"])
            whole.append(stats["throughput/padding_share_batch_padded"])
        print(f"{name} step {step}: {time.perf_counter() - t0:.2f} s, padding {stats['throughput/padding_share']:.3f} "
              f"(batch-padded {stats['throughput/padding_share_batch_padded']:.3f}), mean response "
              f"{statistics.mean(map(len, gen.responses)):.1f} tokens", flush=True)
    return {"median_step_s": statistics.median(times), "padding_share": statistics.mean(shares),
            "padding_share_batch_padded": statistics.mean(whole)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/padding")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = {"cut": run("cut", args.steps, out)}
    with padded_like_the_batch():
        results["batch_padded"] = run("batch_padded", args.steps, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "padding.json").write_text(json.dumps(results, indent=2))
    cut, old = results["cut"], results["batch_padded"]
    print(f"padding share of the update's positions: {old['padding_share']:.1%} -> {cut['padding_share']:.1%}; "
          f"median step {old['median_step_s']:.2f} s -> {cut['median_step_s']:.2f} s "
          f"({old['median_step_s'] / cut['median_step_s']:.2f}x)")


if __name__ == "__main__":
    main()
