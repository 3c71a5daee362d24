"""One workload of rl_workloads.py through tether's step API (tether's .venv):

    python bench/run_tether_grpo.py c-tiny --steps 5 [--warmup 1] [--threads 2] [--ops 25]
    python bench/run_tether_grpo.py v-ppo-240 --steps 1

--warmup untimed steps, then --steps timed steps of generate -> reward -> step; prints one RESULT line
(median step time and phases, episodes/s, tokens/s, peak RSS of the process over all of them). With --ops K one
more step runs under torch.profiler afterwards (after the peak RSS is read), and its top operators go along.

tether settings: method grpo (group mean/std baseline, the KL term beta * k3 in the loss, token-mean loss
aggregation over the minibatch = TRL's loss_type "dapo"), or ppo (critic, the KL in the reward); batch_size =
minibatch_size = every rollout of the step, ppo_epochs 1, gradient_accumulation_steps 1; the rest as in
rl_workloads.py. The phases come from tether itself: `generate`, the reward, and step()'s time/score (the
no-grad scoring passes of the policy and the reference) and time/optimise (the update).
"""

import time

import torch
from rl_workloads import StepClock, model_folder, peak_rss_mb, profile_summary, prompt_rows, runner_args, summarise
from workloads import emit, load_inputs, logits_checksum, progress, token_share


def build(w, steps: int):
    from tether import PPOConfig
    from tether.trainers import trainer_class

    path, _, meta = load_inputs(w.inputs, "tether")
    path = model_folder(w, meta, path)
    config = PPOConfig(
        algorithm=w.algorithm, model=str(path), output_dir=str(path.parent / f"tether-{w.name}-run"),
        seed=w.seed, steps=steps, batch_size=w.batch_size, num_generations=w.num_generations,
        minibatch_size=w.batch_size, ppo_epochs=1, gradient_accumulation_steps=1, learning_rate=w.learning_rate,
        init_kl_coef=w.beta, adaptive_kl=False, max_new_tokens=w.max_new_tokens,
        min_new_tokens=w.max_new_tokens if w.force_length else 0, temperature=1.0, top_k=0, top_p=1.0,
        max_grad_norm=1.0, adam_eps=1e-5, weight_decay=0.0, lr_scheduler_type="constant", precision="fp32",
        device="cpu", report_to=["none"],
        **({"kl_in_loss": True, "kl_estimator": "k3", "loss_aggregation": "token_mean", "scale_rewards": "group"}
           if w.algorithm == "grpo" else {}))
    return trainer_class(w.algorithm)(config), meta


def main() -> None:
    args = runner_args()
    w = args.workload
    import tether
    from tether.demo import vader_reward

    trainer, meta = build(w, args.warmup + args.steps + (1 if args.ops else 0))
    ids, _ = prompt_rows(w, meta)
    checksum = logits_checksum(trainer.policy.model, meta["prompt_ids"])
    queries = [torch.tensor(q) for q in ids for _ in range(w.num_generations)]  # rows k*G .. k*G+G-1: prompt k
    timings, tokens, rewards, peak, profile = [], [], [], None, None
    for step in range(args.warmup + args.steps + (1 if args.ops else 0)):
        profiled = step == args.warmup + args.steps
        if profiled:
            peak = peak_rss_mb()  # the profiler's own memory stays out of the figure
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
        clock = StepClock()
        gen = trainer.generate(queries)
        t1 = time.perf_counter()
        if w.reward == "vader":
            scores = vader_reward([""] * len(gen.texts), gen.texts)
        else:
            scores = token_share([r.tolist() for r in gen.responses])
        t2 = time.perf_counter()
        stats = trainer.step(gen.queries, gen.responses, scores)
        clock.phases = {"generate": t1 - clock.t0, "reward": t2 - t1, "score": stats["time/score"],
                        "optimise": stats["time/optimise"], "step": time.perf_counter() - t2}
        t = clock.done()
        n = sum(len(r) for r in gen.responses)
        kind = " (warm-up)" if step < args.warmup else " (profiled)" if profiled else ""
        progress(f"tether {w.name} step {step}{kind}: {t['total']:.2f} s (generate {t['generate']:.2f}, score "
                 f"{t['score']:.2f}, optimise {t['optimise']:.2f}), {n} tokens, reward {sum(scores) / len(scores):.3f}, "
                 f"kl {stats['objective/kl']:.3f}, peak RSS {peak_rss_mb():.0f} MB")
        if profiled:
            prof.__exit__(None, None, None)
            profile = {**profile_summary(prof, args.ops), "step_s": t}
        elif step >= args.warmup:
            timings.append(t)
            tokens.append(n)
            rewards.append(sum(scores) / len(scores))
    result = summarise(w, "tether", timings, tokens, rewards, peak or peak_rss_mb())
    result.update({"tether": getattr(tether, "__version__", "dev"), "logits_checksum": checksum,
                   "settings": {k: getattr(trainer.config, k) for k in (
                       "algorithm", "batch_size", "num_generations", "minibatch_size", "ppo_epochs", "kl_in_loss",
                       "kl_estimator", "init_kl_coef", "loss_aggregation", "scale_rewards", "min_new_tokens",
                       "max_new_tokens", "learning_rate", "adam_eps", "precision", "keep_freed_memory")},
                   **({"profile": profile} if profile else {})})
    emit(result)


if __name__ == "__main__":
    main()
