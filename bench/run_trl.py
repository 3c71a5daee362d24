"""One workload through TRL 0.11.4's classic PPOTrainer (bench/.venv-trl): .venv-trl/bin/python run_trl.py a --steps 3

The same model weights, prompt ids, sampling, batch shape, epochs, learning rate, KL coefficient and reward
as run_tether.py. TRL generates the whole batch in one `generate` call (its default would be 4 at a time).
One untimed warm-up step, then --steps timed steps of generate -> reward -> step. Prints one RESULT line.

--precision bf16: Accelerate's bf16 mixed precision (PPOConfig(accelerator_kwargs={"mixed_precision": "bf16"})),
which on a CPU wraps the forward of every model the trainer prepares (the policy with its value head, the
reference copy) in torch.autocast(bfloat16) and casts their outputs back to fp32; weights and AdamW stay fp32.
TRL generates through `unwrapped_model.generate`, i.e. the inner pretrained model's `generate`, which does not
pass through that wrapped forward: generation would stay fp32. tether autocasts its generation as well, so here
TRL's `generate` call runs inside `trainer.accelerator.autocast()` (the same bf16 autocast) to compare like with
like. The DtypeProbe counts in the RESULT show which forward passes ran in which dtype.
"""

import time
import warnings
from contextlib import nullcontext

import torch
from workloads import (
    DtypeProbe,
    emit,
    load_inputs,
    logits_checksum,
    mean,
    progress,
    runner_args,
    stored_dtypes,
    summary,
    token_share,
    vader,
)


def main() -> None:
    w, steps, precision, _ = runner_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    import trl
    from transformers import AutoTokenizer, set_seed
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    path, prompt_ids, _ = load_inputs(w.name, "trl")
    set_seed(w.seed)
    config = PPOConfig(model_name=str(path), seed=w.seed, batch_size=w.batch_size, mini_batch_size=w.minibatch_size,
                       ppo_epochs=w.ppo_epochs, gradient_accumulation_steps=1, learning_rate=w.learning_rate,
                       init_kl_coef=w.init_kl_coef, adap_kl_ctrl=False, kl_penalty="kl", max_grad_norm=1.0,
                       **({"accelerator_kwargs": {"mixed_precision": "bf16"}} if precision == "bf16" else {}))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(path))
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)  # reference: a frozen copy
    checksum = logits_checksum(model.pretrained_model.eval(), prompt_ids)  # not autocast: fp32 on both sides
    probe = DtypeProbe(policy=model, reference=trainer.ref_model)
    generate_autocast = trainer.accelerator.autocast if precision == "bf16" else nullcontext
    generation_kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "min_length": -1,
                         "max_new_tokens": w.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    queries = [torch.tensor(q) for q in prompt_ids]
    timings, tokens, rewards = [], [], []
    for step in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        probe.phase = "generate"
        with generate_autocast():
            responses = trainer.generate(queries, batch_size=len(queries), return_prompt=False, **generation_kwargs)
        probe.phase = None
        t1 = time.perf_counter()
        if w.reward == "vader":
            scores = vader(tokenizer.batch_decode(responses, skip_special_tokens=True))
        else:
            scores = token_share([r.tolist() for r in responses])
        t2 = time.perf_counter()
        probe.phase = "step"
        stats = trainer.step(queries, responses, [torch.tensor(s) for s in scores])
        probe.phase = None
        t3 = time.perf_counter()
        n_tokens = sum(len(r) for r in responses)
        progress(f"TRL ({w.name}) step {step}{' (warm-up)' if step == 0 else ''}: {t3 - t0:.2f} s, "
                 f"{n_tokens} tokens, reward {mean(scores):.3f}, kl {float(stats['objective/kl']):.3f}")
        if step == 0:
            continue
        timings.append({"generate": t1 - t0, "reward": t2 - t1, "step": t3 - t2, "total": t3 - t0,
                        "cpu": time.process_time() - c0})
        tokens.append(n_tokens)
        rewards.append(mean(scores))
    result = summary(w, "trl", timings, tokens, rewards)
    result.update({"trl": trl.__version__, "logits_checksum": checksum, "precision": precision,
                   "mixed_precision": trainer.accelerator.mixed_precision, "forward_dtypes": probe.seen,
                   "stored_dtypes": stored_dtypes(model, trainer.ref_model, trainer.optimizer)})
    emit(result)


if __name__ == "__main__":
    main()
