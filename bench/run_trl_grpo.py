"""One workload of rl_workloads.py through TRL 1.16's GRPOTrainer (bench/.venv-trl116):

    .venv-trl116/bin/python run_trl_grpo.py c-tiny --steps 5 [--warmup 1] [--threads 2] [--ops 25]

TRL is driven the way its documentation shows, without the hub: the model as a local folder path (TRL loads it,
and its reference copy, with AutoModelForCausalLM in float32), the tokenizer of that folder as the processing
class, a `datasets.Dataset` with a `prompt` column of plain-text prompts, and the reward as a Python callable
taking (prompts, completions, completion_ids, ...). No vLLM (use_vllm=False): transformers' `generate`.

Matched to run_tether_grpo.py: per_device_train_batch_size = every rollout of the step, gradient_accumulation_steps
1, num_iterations 1 (so one optimiser step per generation), num_generations 4, max_completion_length, beta (k3 KL
in the loss), loss_type "dapo" (TRL 1.16's default: token mean over the whole batch = tether's token_mean),
scale_rewards "group", epsilon 0.2, learning rate, constant schedule, AdamW eps 1e-5, no weight decay, gradient
norm 1.0, temperature 1, top_k 0, top_p 1, fp32 (bf16=False: TRL's configs default to bf16 on), no gradient
checkpointing (TRL's default is on), dropout disabled, the dataset unshuffled so every step sees the same prompts.
For the curve workloads generation_kwargs={"min_new_tokens": L} suppresses EOS as tether's min_new_tokens does.

Timing: a TrainerCallback marks each optimiser step (on_step_begin -> on_step_end: generation, reward, the
reference's log-probs, the loss, backward, AdamW). `generate` is the policy's `generate` calls (the instance's
method is wrapped); `score` is the rest of TRL's _generate_and_score_completions (reference log-probs, reward,
advantages); `optimise` the rest of the step. Prints one RESULT line.
"""

import functools
import tempfile
import time
import warnings

import torch
from rl_workloads import StepClock, model_folder, peak_rss_mb, profile_summary, prompt_rows, runner_args, summarise
from workloads import emit, load_inputs, logits_checksum, progress, token_share, vader


def main() -> None:
    args = runner_args()
    w = args.workload
    warnings.filterwarnings("ignore", category=FutureWarning)
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    path, _, meta = load_inputs(w.inputs, "tether")  # transformers 5.24 on both sides: tether's own folder
    path = model_folder(w, meta, path)
    ids, texts = prompt_rows(w, meta)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenized = [tokenizer(t)["input_ids"] for t in texts]  # what TRL's _tokenize_prompts will feed the model
    if tokenized != ids:
        raise SystemExit(f"TRL would tokenise the prompts differently from the prepared ids:\n{tokenized}\n{ids}")
    total_steps = args.warmup + args.steps + (1 if args.ops else 0)
    # w.prompts distinct prompts per step, the same every step: TRL's sampler repeats each num_generations times
    dataset = Dataset.from_dict({"prompt": texts * total_steps})

    timings, tokens, rewards, marks = [], [], [], {}

    def reward(prompts, completions, completion_ids, **_):
        scores = vader(completions) if w.reward == "vader" else token_share(completion_ids)
        marks["reward"] = sum(scores) / len(scores)
        return scores

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), seed=w.seed, max_steps=total_steps,
        per_device_train_batch_size=w.batch_size, gradient_accumulation_steps=1, num_generations=w.num_generations,
        num_iterations=1, max_completion_length=w.max_new_tokens, beta=w.beta, loss_type="dapo",
        scale_rewards="group", epsilon=0.2, learning_rate=w.learning_rate, lr_scheduler_type="constant",
        warmup_steps=0, adam_epsilon=1e-5, weight_decay=0.0, max_grad_norm=1.0, temperature=1.0, top_k=0, top_p=1.0,
        generation_kwargs={"min_new_tokens": w.max_new_tokens} if w.force_length else None,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, use_vllm=False, disable_dropout=True,
        shuffle_dataset=False, dataloader_num_workers=0, logging_strategy="no", save_strategy="no",
        report_to="none", disable_tqdm=True, log_completions=False)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kw):
            marks.update(clock=StepClock(), generate=0.0, score=0.0, tokens=0, reward=None)
            if state.global_step == args.warmup + args.steps:  # the extra profiled step
                marks["peak"] = peak_rss_mb()
                marks["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                marks["prof"].__enter__()

        def on_step_end(self, args_, state, control, **kw):
            clock = marks["clock"]
            clock.phases = {"generate": marks["generate"], "score": marks["score"] - marks["generate"]}
            t = clock.done()
            t["optimise"] = t["total"] - marks["score"]
            step = state.global_step - 1
            kind = " (warm-up)" if step < args.warmup else " (profiled)" if "prof" in marks else ""
            progress(f"TRL {w.name} step {step}{kind}: {t['total']:.2f} s (generate {t['generate']:.2f}, score "
                     f"{t['score']:.2f}, optimise {t['optimise']:.2f}), {marks['tokens']} tokens, reward "
                     f"{marks['reward']:.3f}, peak RSS {peak_rss_mb():.0f} MB")
            if "prof" in marks:
                prof = marks.pop("prof")
                prof.__exit__(None, None, None)
                marks["profile"] = {**profile_summary(prof, args.ops), "step_s": t}
            elif step >= args.warmup:
                timings.append(t)
                tokens.append(marks["tokens"])
                rewards.append(marks["reward"])

    trainer = GRPOTrainer(model=str(path), reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    checksum = logits_checksum(trainer.model, meta["prompt_ids"])

    generate = trainer.model.generate

    @functools.wraps(generate)
    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        out = generate(*a, **k)
        marks["generate"] += time.perf_counter() - t0
        return out

    trainer.model.generate = timed_generate
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate_and_score(inputs):
        t0 = time.perf_counter()
        out = generate_and_score(inputs)
        marks["score"] += time.perf_counter() - t0
        marks["tokens"] += int(out["completion_mask"].sum())
        return out

    trainer._generate_and_score_completions = timed_generate_and_score

    trainer.train()
    result = summarise(w, "trl", timings, tokens, rewards, marks.get("peak") or peak_rss_mb())
    result.update({"trl": trl.__version__, "logits_checksum": checksum,
                   "settings": {k: getattr(config, k) for k in (
                       "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                       "num_generations", "num_iterations", "beta", "loss_type", "scale_rewards", "epsilon",
                       "max_completion_length", "generation_kwargs", "learning_rate", "adam_epsilon", "bf16",
                       "gradient_checkpointing", "use_vllm", "temperature", "top_k", "top_p")},
                   **({"profile": marks["profile"]} if "profile" in marks else {})})
    emit(result)


if __name__ == "__main__":
    main()
