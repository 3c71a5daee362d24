"""Does torch.compile pay for the PPO update's forward + backward? (tether's .venv)

    OMP_NUM_THREADS=2 python bench/compile_probe.py a [--repeats 10] [--mode default]

Loads the workload's model and times one minibatch of the update (teacher-forced forward over P + T tokens,
log-probs of the response tokens, backward) eagerly and under torch.compile (inductor, needs a C++ compiler),
best of --repeats each, plus the compile time (the first compiled call). The shapes are the workload's: its
minibatch size, prompt length and max_new_tokens. Nothing here changes what tether runs; it answers whether
wrapping the policy in torch.compile (a trainer-side choice) would be worth its compile time.
"""

import argparse
import time

import torch
from workloads import WORKLOADS, load_inputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mode", default="default")
    args = parser.parse_args()
    w = WORKLOADS[args.workload]
    from transformers import AutoModelForCausalLM

    from tether.ops.logprobs import gather_logprobs
    from tether.rollout.generate import positions

    path, prompt_ids, _ = load_inputs(w.name, "tether")
    model = AutoModelForCausalLM.from_pretrained(str(path)).train()
    B, P, T = w.minibatch_size, max(map(len, prompt_ids)), w.max_new_tokens
    V = model.get_output_embeddings().out_features
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(V, (B, P + T), generator=g)
    mask = torch.ones_like(ids)

    def update(m) -> float:
        out = m(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                logits_to_keep=T + 1)
        logprobs = gather_logprobs(out.logits[:, :-1], ids[:, P:])
        logprobs.mean().backward()
        model.zero_grad(set_to_none=True)
        return float(logprobs.detach().sum())

    def best(m) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            update(m)
            times.append(time.perf_counter() - t0)
        return min(times)

    update(model)
    eager = best(model)
    compiled = torch.compile(model, mode=args.mode)
    t0 = time.perf_counter()
    try:
        update(compiled)
    except Exception as err:  # no compiler, unsupported op: report instead of failing
        print(f"workload ({w.name}): torch.compile failed after {time.perf_counter() - t0:.1f} s: "
              f"{type(err).__name__}: {str(err)[:300]}")
        return
    compile_s = time.perf_counter() - t0
    fast = best(compiled)
    print(f"workload ({w.name}) minibatch {B} x (P {P} + T {T}), torch threads {torch.get_num_threads()}: "
          f"eager {eager * 1e3:.1f} ms, compiled {fast * 1e3:.1f} ms per forward+backward "
          f"({eager / fast:.2f}x), compile {compile_s:.1f} s, break-even after {compile_s / max(eager - fast, 1e-9):.0f} "
          f"minibatches")


if __name__ == "__main__":
    main()
