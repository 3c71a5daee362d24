"""Would a trainer-side change pay for the PPO update's forward + backward? (tether's .venv)

    OMP_NUM_THREADS=2 python bench/update_probe.py b --sparse-embedding [--compile] [--repeats 10]

Loads the workload's model and times one minibatch of the update (teacher-forced forward over P + T tokens,
log-probs of the response tokens, backward; no optimiser) eagerly, best of --repeats, then with each variant:
  --sparse-embedding  the input embedding's gradient as a sparse tensor (nn.Embedding.sparse = True). With tied
                      input/output embeddings (SmolLM2) the dense embedding gradient costs a zero-filled
                      (V, H) tensor and a full (V, H) add into the LM head's gradient on every backward; sparse,
                      only the rows of the tokens present are added. The summed gradient is the same (checked).
  --keep-freed-memory tether's keep_freed_memory() first (what the trainer does on the CPU by default), so
                      every timing below reuses freed memory instead of page-faulting large buffers in again.
  --compile           torch.compile (inductor, needs a C++ compiler); prints the compile time too. With --bf16,
                      compiled under bf16 autocast with tether's fp32 attention (what compile=true and
                      precision="bf16" run on the CPU); with --ops N as well, the top N operators of one compiled
                      update and the rate its matmuls (aten::mm and addmm, self time) reach: 6 x params x tokens FLOPs.
  --bf16              under bf16 autocast (weights stay fp32), with the model's own sdpa attention and then with
                      tether's fp32 attention (what precision="bf16" does on the CPU); with --ops N, the top N
                      operators by self CPU time of one update, fp32 and bf16.
The shapes are the workload's minibatch, prompt length and max_new_tokens. Nothing here changes what tether
runs; it measures what a change in the trainer or model set-up would buy.
"""

import argparse
import time
from contextlib import nullcontext

import torch
from workloads import WORKLOADS, load_inputs, update_flops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    parser.add_argument("--sparse-embedding", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--ops", type=int, default=0)
    parser.add_argument("--keep-freed-memory", action="store_true")
    args = parser.parse_args()
    if args.keep_freed_memory:
        from tether.trainers.setup import keep_freed_memory

        print(f"keep_freed_memory applied: {keep_freed_memory()}")
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

    def update(m, keep_grad: bool = False, autocast: bool = False) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
            out = m(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                logits_to_keep=T + 1)
        logprobs = gather_logprobs(out.logits[:, :-1], ids[:, P:])
        logprobs.mean().backward()
        if not keep_grad:
            model.zero_grad(set_to_none=True)
        return float(logprobs.detach().sum())

    def best(m, autocast: bool = False) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            update(m, autocast=autocast)
            times.append(time.perf_counter() - t0)
        return min(times)

    def grads() -> tuple[dict, bool]:
        """The summed gradients of one update (dense), and whether every .grad the optimiser would see is dense."""
        update(model, keep_grad=True)
        held = [p.grad for p in model.parameters() if p.grad is not None]
        out = {n: p.grad.to_dense().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out, not any(g.is_sparse for g in held)

    update(model)
    eager = best(model)
    print(f"workload ({w.name}) minibatch {B} x (P {P} + T {T}), torch threads {torch.get_num_threads()}: "
          f"eager {eager * 1e3:.1f} ms per forward+backward (best of {args.repeats})")
    if args.bf16:
        update(model, autocast=True)
        t = best(model, autocast=True)
        print(f"  bf16 autocast: {t * 1e3:.1f} ms ({eager / t:.2f}x)")
        from tether.models.attention import fp32_attention_on_cpu

        if fp32_attention_on_cpu(model):
            update(model, autocast=True)
            t = best(model, autocast=True)
            print(f"  bf16 autocast, attention in fp32 (tether's CPU default): {t * 1e3:.1f} ms ({eager / t:.2f}x)")
            model.set_attn_implementation("sdpa")
        for autocast in (False, True) if args.ops else ():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                update(model, autocast=autocast)
            print(f"  one update, {'bf16 autocast' if autocast else 'fp32'}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))
    if args.sparse_embedding:
        dense, _ = grads()
        model.get_input_embeddings().sparse = True
        sparse, all_dense = grads()
        diff = max((dense[n] - sparse[n]).abs().max().item() for n in dense)
        t = best(model)
        tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
        print(f"  sparse embedding gradient: {t * 1e3:.1f} ms ({eager / t:.2f}x); tied embeddings: {tied}; "
              f"max |grad difference| {diff:.2e}; every .grad dense (fused AdamW needs it): {all_dense}")
        model.get_input_embeddings().sparse = False
    if args.compile:
        if args.bf16:  # compared with eager bf16 autocast and fp32 attention, as the trainer would run it
            from tether.models.attention import fp32_attention_on_cpu

            fp32_attention_on_cpu(model)
            eager = best(model, autocast=True)
            print(f"  bf16 autocast, attention in fp32, eager: {eager * 1e3:.1f} ms")
        compiled = torch.compile(model, mode=args.mode)
        t0 = time.perf_counter()
        try:
            update(compiled, autocast=args.bf16)
        except Exception as err:  # no compiler, unsupported op: report instead of failing
            print(f"  torch.compile failed after {time.perf_counter() - t0:.1f} s: {type(err).__name__}: "
                  f"{str(err)[:300]}")
            return
        compile_s = time.perf_counter() - t0
        fast = best(compiled, autocast=args.bf16)
        gain = eager - fast
        print(f"  torch.compile: {fast * 1e3:.1f} ms ({eager / fast:.2f}x), compile {compile_s:.1f} s"
              + (f", pays back after {compile_s / gain:.0f} minibatches" if gain > 0 else ", never pays back"))
        if args.ops:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                update(compiled, autocast=args.bf16)
            ops = prof.key_averages()
            print(ops.table(sort_by="self_cpu_time_total", row_limit=args.ops))
            mm_s = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::mm", "aten::addmm")) / 1e6
            flops = update_flops(model, B, P, T)
            print(f"  matmuls of one compiled update: {flops / 1e9:.1f} GFLOP in {mm_s * 1e3:.0f} ms of mm/addmm = "
                  f"{flops / mm_s / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
