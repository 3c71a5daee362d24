"""One workload through tether's step API (tether's .venv): python bench/run_tether.py a --steps 3 [--precision bf16]

One untimed warm-up step, then --steps timed steps of generate -> reward -> step. Prints one RESULT line.
--precision bf16 sets PPOConfig(precision="bf16"): generation, scoring and update forward passes under bf16
autocast, weights and AdamW in fp32 (fp32, the default, is what precision="auto" means on a CPU).
--compile sets PPOConfig(compile=True) (the warm-up step then includes the compile; only the reference's dtypes
are probed, as the policy's forward is compiled).
Training-phase FLOPs (a model-FLOPs count, the usual 6 x params x tokens for forward + backward):
    6 * ppo_epochs * (N_body * B * (P + T) + N_head * B * T)
N_body: parameters outside the embeddings and the LM head; N_head = vocabulary x width (tether projects only
the T response positions onto the vocabulary); P, T: padded prompt and response lengths of the step.
Attention score FLOPs, the value head and the optimiser update are left out (small at these lengths).
Divided by time/optimise (the PPO epochs alone; median over the timed steps) it gives the GFLOP/s compare.py sets against matmul.py.
"""

import time

import torch
from workloads import (
    DtypeProbe,
    emit,
    load_inputs,
    logits_checksum,
    mean,
    param_counts,
    progress,
    runner_args,
    stored_dtypes,
    summary,
    token_share,
    update_flops,
)


def workload_trainer(w, steps: int, run_name: str, precision: str = "fp32", compile_: bool = False):
    """tether's PPOTrainer for workload `w` (its prepared model and prompt ids) -> (trainer, prompt ids, meta)."""
    from tether import PPOConfig
    from tether.trainers import PPOTrainer

    path, prompt_ids, meta = load_inputs(w.name, "tether")
    config = PPOConfig(model=str(path), output_dir=str(path.parent / run_name), seed=w.seed,
                       steps=steps + 1, batch_size=w.batch_size, minibatch_size=w.minibatch_size,
                       ppo_epochs=w.ppo_epochs, gradient_accumulation_steps=1, learning_rate=w.learning_rate,
                       init_kl_coef=w.init_kl_coef, adaptive_kl=False, max_new_tokens=w.max_new_tokens,
                       temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=0, max_grad_norm=1.0,
                       precision=precision, compile=compile_)
    return PPOTrainer(config), prompt_ids, meta


def main() -> None:
    w, steps, precision, compile_ = runner_args(compile_option=True)
    import tether
    from tether.demo import vader_reward

    trainer, prompt_ids, meta = workload_trainer(w, steps, "tether-run", precision, compile_)
    checksum = logits_checksum(trainer.policy.model, prompt_ids)  # outside autocast: fp32 on both sides
    # Under compile only the reference (eager): torch.compile would trace the policy's hook, and its counting (a
    # Python dict that changes at every call) would make it recompile until it gives up and runs eagerly.
    probe = DtypeProbe(reference=trainer.ref) if compile_ else DtypeProbe(policy=trainer.policy.model,
                                                                          reference=trainer.ref)
    queries = [torch.tensor(q) for q in prompt_ids]
    body, head = param_counts(trainer.policy.model)  # for the result; update_flops counts them itself
    timings, tokens, rewards, flops = [], [], [], []
    for step in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        probe.phase = "generate"
        gen = trainer.generate(queries)
        probe.phase = None
        t1 = time.perf_counter()
        if w.reward == "vader":
            scores = vader_reward([""] * len(gen.texts), gen.texts)
        else:
            scores = token_share([r.tolist() for r in gen.responses])
        t2 = time.perf_counter()
        probe.phase = "step"
        stats = trainer.step(gen.queries, gen.responses, scores)
        probe.phase = None
        t3 = time.perf_counter()
        n_tokens = sum(len(r) for r in gen.responses)
        progress(f"tether ({w.name}) step {step}{' (warm-up)' if step == 0 else ''}: {t3 - t0:.2f} s, "
                 f"{n_tokens} tokens, reward {mean(scores):.3f}, kl {stats['objective/kl']:.3f}")
        if step == 0:
            continue
        B, P, T = len(queries), max(map(len, gen.queries)), max(map(len, gen.responses))
        flops.append(w.ppo_epochs * update_flops(trainer.policy.model, B, P, T))
        timings.append({"generate": t1 - t0, "reward": t2 - t1, "score_forward": stats["time/score"],
                        "optimise": stats["time/optimise"], "step": t3 - t2, "total": t3 - t0,
                        "cpu": time.process_time() - c0})
        tokens.append(n_tokens)
        rewards.append(mean(scores))
    result = summary(w, "tether", timings, tokens, rewards)
    result.update({"tether": getattr(tether, "__version__", "dev"), "logits_checksum": checksum,
                   "params_body": body, "params_head": head, "train_flops_per_step": mean(flops),
                   "train_gflops_per_s": mean(flops) / result["s_per_step"]["optimise"] / 1e9,
                   "precision": precision, "compile": compile_, "forward_dtypes": probe.seen,
                   "stored_dtypes": stored_dtypes(trainer.trainable, trainer.ref, trainer.optimizer)})
    emit(result)


if __name__ == "__main__":
    main()
