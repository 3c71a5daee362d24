"""The RL trainer every method shares; `step` reads as the data flow of docs/design.md:

    1 generate -> 2 reward -> 3 score -> 4 process scores -> 5 advantages, whiten -> 6 optimise -> 7 KL control,
    metrics

One `Rollouts` batch flows down through plain functions (trainers/scoring.py, algorithms.py, optimise.py,
metrics.py); nothing below the trainer calls back into it. A method is one entry of `tether.algorithms`:
its advantage function, whether it trains a critic, its defaults.
"""

import logging
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from transformers import get_scheduler

from tether.algorithms import ALGORITHMS
from tether.config import PPOConfig
from tether.distributed import Ranks
from tether.extras import check_extras
from tether.partition import check_sizes, rank_seed
from tether.models.policy import Trained
from tether.ops import get_estimator, masked_whiten
from tether.ops.kl_control import AdaptiveKLController, FixedKLController
from tether.ops.rewards import RunningMoments, process_scores
from tether.report import build_report
from tether.rewards import COMPLETION_INFO, accepted_keywords
from tether.rollout import Sampler
from tether.rollout.batch import Generation, Rollouts
from tether.rollout.engines import build_engine, check_engine
from tether.chat import load_chat_prompts
from tether.trainers.assemble import build_models, column_names, prompt_fields
from tether.trainers.behaviour import correction_for, with_behaviour
from tether.trainers.checkpoint import hold_output_dir, maybe_resume, save_trained, write_checkpoint
from tether.trainers.collect import collect, length_shaped, loss_rows
from tether.trainers.guards import FaultCounter, warn_if_negative_kl
from tether.trainers.metrics import gather_per_sequence, kl_per_sequence, step_metrics
from tether.trainers.optimise import Learner, optimise
from tether.trainers.run import NoLog, RunLogger
from tether.trainers.evaluate import maybe_evaluate
from tether.trainers.scoring import reference_states, score_rollouts
from tether.trainers.setup import (autocast_dtype, check_compile, check_step_inputs, check_token_rows, encode_prompt,
                                   eos_ids, keep_freed_memory, load_tokenizer, make_adamw, return_large_buffers,
                                   seed_everything)
from tether.trainers.state import Progress, RandomState

log = logging.getLogger("tether")


class RLTrainer:
    algorithm: str | None = None  # a named subclass (PPOTrainer, ...) runs only its own; None: config.algorithm

    def __init__(self, config: PPOConfig, model=None, tokenizer=None, prompts=None, reward=None,
                 ref_model=None, logits_processors=()) -> None:
        """model / prompts / reward override the config's keys; ref_model defaults to a frozen copy of the
        policy as it is at the start; logits_processors: extra transformers processors, replayed when scoring."""
        self.config = c = config
        check_extras(c)  # a missing optional package is named now, not after the models have loaded
        if self.algorithm is not None and c.algorithm != self.algorithm:
            raise ValueError(f"{type(self).__name__} runs algorithm={self.algorithm!r} but the config says "
                             f"{c.algorithm!r}; build the config with PPOConfig(algorithm={self.algorithm!r}, ...)")
        self.method = ALGORITHMS[c.algorithm]
        if c.lora_r and ref_model is not None:
            raise ValueError("with lora_r > 0 the reference is the policy with its adapters disabled; "
                             "ref_model cannot be given as well")
        self.ranks = Ranks(cpu=c.device == "cpu")
        self.comm = self.ranks.comm  # the collectives the step's statistics need
        check_engine(c, logits_processors, self.ranks.sharding if self.ranks.sharded else "")  # before models load
        if c.lora_r and self.ranks.sharded:
            raise ValueError("LoRA (lora_r > 0) with sharded parameters (DeepSpeed ZeRO-3, FSDP) is not supported "
                             "yet: run LoRA on DDP or ZeRO-2; the adapter is small and the frozen base needs no "
                             "optimiser state")
        # Sizes in the config are global; this process holds local_batch rollouts and local_minibatch rows of each
        # minibatch (whole groups of num_generations each).
        self.local_batch, self.local_minibatch = check_sizes(c.batch_size, c.minibatch_size, self.comm.num,
                                                             c.gradient_accumulation_steps, c.num_generations)
        self.device = self.ranks.device or torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device)
        self.autocast_dtype = autocast_dtype(c.precision, self.device)
        if c.compile:
            check_compile(self.device, self.ranks.sharding if self.ranks.sharded else "")
        if self.device.type == "cpu":
            (keep_freed_memory if c.keep_freed_memory else return_large_buffers)()
        seed_everything(c.seed)
        self.tokenizer = load_tokenizer(tokenizer, model if model is not None else c.model, c.chat_template)
        rows = load_chat_prompts(prompts if prompts is not None else c.prompts, c.prompt_column, self.tokenizer)
        self.eval_rows = load_chat_prompts(c.eval_prompts, c.prompt_column, self.tokenizer, "eval_prompts")
        m = build_models(c, self.ranks, self.device, self.autocast_dtype, self.method.uses_critic, self.tokenizer,
                         model, ref_model, reward, self.local_batch)
        self.policy, self.critic, self.ref, self.peft, self.reward = m.policy, m.critic, m.ref, m.peft, m.reward
        self.ref_head = m.ref_head
        self.vocab_size = m.vocab_size
        self.prompts, self.prompt_columns, self.prompt_texts = prompt_fields(rows, self.tokenizer)  # (N,) each
        self.reward_keywords = accepted_keywords(self.reward, (*COMPLETION_INFO, *column_names(rows, self.eval_rows))
                                                 ) if self.reward is not None else ()
        self.trainable = Trained(self.policy, self.critic)  # everything trained, as one module: checkpoints hold this
        self.eos_token_ids = eos_ids(self.tokenizer, self.policy.model)
        self.sampler = Sampler(self.eos_token_ids, c.temperature, c.top_k, c.top_p, c.min_new_tokens,
                               c.repetition_penalty, c.no_repeat_ngram_size, logits_processors)
        self.encode = partial(encode_prompt, self.tokenizer, self.policy.model, c.max_new_tokens)  # (text, where)
        self.encoded_prompts = [self.encode(p, f"prompt row {i}") for i, p in enumerate(self.prompts or [])]

        self.kl_ctl = (AdaptiveKLController(c.init_kl_coef, c.kl_target, c.kl_horizon) if c.adaptive_kl
                       else FixedKLController(c.init_kl_coef))
        self.score_moments = RunningMoments()
        self.optimizer = make_adamw([p for p in self.trainable.parameters() if p.requires_grad], lr=c.learning_rate,
                                    weight_decay=c.weight_decay, eps=c.adam_eps)
        updates = c.steps * c.ppo_epochs * (c.batch_size // c.minibatch_size)
        self.scheduler = get_scheduler(c.lr_scheduler_type, self.optimizer, num_warmup_steps=c.warmup_steps,
                                       num_training_steps=updates)
        # Forward passes that train go through this: DDP, a DeepSpeed engine or FSDP on several processes.
        trained = self.ranks.prepare(self.trainable, self.optimizer, c.minibatch_size, c.gradient_accumulation_steps,
                                     c.max_grad_norm, ["rollout"])
        if c.compile:  # lazily: the first scoring pass and the first update compile (one graph each, grad or not)
            log.info("compile=true: the first step compiles the trained forward pass; later steps reuse it")
            trained = torch.compile(trained)
        # Clipped apart: a separate critic's large early gradients must not shrink the policy's step. Taken after
        # `prepare`, which may replace the parameters (FSDP's are sharded); DeepSpeed clips with its own norm.
        clip_groups = [[p for p in m.parameters() if p.requires_grad]
                       for m in ([self.policy, self.critic] if self.critic is not None else [self.policy])]
        self.sample_generator = sample = torch.Generator(self.device).manual_seed(rank_seed(c.seed, self.comm.rank))
        self.engine, self.correction = build_engine(self, sample), correction_for(c)  # rollout/engines.py
        shuffle = torch.Generator().manual_seed(c.seed + 1)  # minibatch partitions
        data = torch.Generator().manual_seed(c.seed + 2)  # prompt order
        self.progress = Progress(data)
        self.faults = FaultCounter(c.max_faults_in_row)
        self.learner = Learner(c, self.ranks, partial(_autocast, self.autocast_dtype, trained), trained, self.sampler,
                               get_estimator(c.kl_estimator), self.optimizer, self.scheduler, clip_groups,
                               self.local_batch, self.local_minibatch, self.device, shuffle)
        self.parts = {"progress": self.progress, "rng": RandomState(sample, shuffle, data), "scheduler": self.scheduler,
                      "kl_ctl": self.kl_ctl, "score_moments": self.score_moments, "faults": self.faults,
                      # under DeepSpeed and FSDP the optimiser states are sharded: each process writes its own
                      **({"optimizer": self.optimizer} if not self.ranks.sharded_state else {}),
                      **({"reward": self.reward} if hasattr(self.reward, "load_state_dict") else {})}

    @property
    def step_count(self) -> int:
        return self.progress.step

    def autocast(self):
        """bf16 autocast for forward passes when `precision` says so; a no-op in fp32."""
        dtype = self.autocast_dtype
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    # ---- step API -----------------------------------------------------------------------------
    def generate(self, queries: list[str] | list[Tensor]) -> Generation:
        """1. Sample one completion per query with the configured sampler."""
        if len(queries) == 0:
            raise ValueError("generate needs at least one query")
        query_tensors = [q if isinstance(q, Tensor) else self.encode(q, f"query {i}") for i, q in enumerate(queries)]
        check_token_rows(query_tensors, "query", self.vocab_size)
        sampled = self.engine([q.cpu() for q in query_tensors])
        texts = self.tokenizer.batch_decode(sampled.responses, skip_special_tokens=True)
        return Generation([q.cpu() for q in query_tensors], sampled.responses, texts, sampled.logprobs)

    def step(self, queries: list[Tensor], responses: list[Tensor], scores,
             behaviour_logprobs: list[Tensor] | None = None) -> dict[str, float]:
        """2-7. One update on rollouts sampled by `generate` (token ids, not re-tokenised text). With
        num_generations = G > 1, rows k*G .. k*G + G - 1 must be completions of the same prompt.
        behaviour_logprobs: `Generation.logprobs` (the engine's: mismatch metrics, rollout_correction)."""
        return self._step(queries, responses, scores, behaviour_logprobs=behaviour_logprobs)[0]

    def _step(self, queries: list[Tensor], responses: list[Tensor], scores, keep: Tensor | None = None,
              behaviour_logprobs: list[Tensor] | None = None) -> tuple[dict[str, float], Tensor]:
        """step(), and each completion's exact KL (B,) for the samples the run logs. keep: (B,) bool, False on
        rows left out of the loss (dynamic sampling's fill)."""
        t0 = time.perf_counter()
        c, comm = self.config, self.comm
        raw_scores = check_step_inputs(queries, responses, scores, self.local_batch, c.num_generations,
                                       self.vocab_size, f"batch_size={c.batch_size}{self._per_process}")
        if comm.any(not torch.isfinite(raw_scores).all()):  # skipped on every process together
            return self._skip_step(raw_scores), torch.full((len(raw_scores),), math.nan)
        scores = length_shaped(c, raw_scores, responses, self.eos_token_ids)  # missing_eos_penalty, overlong
        batch = self.score(queries, responses)  # 3
        rows = loss_rows(c, responses, self.eos_token_ids, keep)
        if rows is not None:
            batch = replace(batch, loss_mask=batch.mask * rows.to(self.device)[:, None])
        self.progress.support_flips += int(batch.flipped.sum())
        batch, engine_stats = with_behaviour(batch, behaviour_logprobs, self.correction, comm)  # 3b
        t_score = time.perf_counter()
        beta = self.kl_ctl.value
        batch = replace(batch, scores=process_scores(scores, c.score_scale, c.score_clip,  # 4
                                                     self.score_moments if c.score_norm else None,
                                                     lambda x: comm.gather(x.to(self.device))).to(self.device))
        advantages, returns, non_score = self.method.advantages(  # 5
            batch, batch.scores, 0.0 if c.kl_in_loss else beta, c, comm.all_reduce)
        if c.whiten_advantages:  # over the tokens trained on in the global batch (every process)
            advantages = masked_whiten(advantages, batch.train_mask, all_reduce=comm.all_reduce)
        batch = replace(batch, advantages=advantages, returns=returns, non_score=non_score)
        t_optimise = time.perf_counter()
        train_stats = optimise(self.learner, batch, beta)  # 6
        self.engine.weights_changed()  # the next generation samples from the updated weights
        t_optimise = time.perf_counter() - t_optimise
        seqs = gather_per_sequence(comm, batch, raw_scores, scores)
        self.kl_ctl.update(seqs["kl"].mean().item(), c.batch_size)  # 7
        self.progress.step += 1
        stats = step_metrics(comm, batch, seqs, beta, self.scheduler.get_last_lr()[0], self.eos_token_ids,
                             self.progress.support_flips, {**train_stats, **engine_stats})  # + rollout/mismatch_*
        stats.update({"time/score": t_score - t0, "time/optimise": t_optimise, "time/step": time.perf_counter() - t0})
        warn_if_negative_kl(seqs["estimate"], self.step_count)
        self.faults.record(train_stats["faults/skipped_minibatches"] > 0, "a minibatch loss or gradient was nan/inf",
                           self.step_count)
        stats["faults/skipped_steps"] = float(self.faults.skipped_steps)
        return stats, kl_per_sequence(batch)

    def score(self, queries: list[Tensor], responses: list[Tensor]) -> Rollouts:
        """3. The rollouts scored: behaviour and reference log-probs, values, KL, entropy (no update)."""
        c = self.config
        ref = partial(_autocast, self.autocast_dtype, partial(
            reference_states, self.ref if self.peft is None else self.policy.model, self.ref_head, self.peft))
        return score_rollouts(self.learner.forward, ref, self.sampler, self.learner.estimator, c.kl_in_loss,
                              queries, responses, self.tokenizer.pad_token_id, self.eos_token_ids,
                              self.local_minibatch // c.gradient_accumulation_steps, self.device)

    def _skip_step(self, raw_scores: Tensor) -> dict[str, float]:
        """A nan/inf score (on any process): no update at all this step (the weights are untouched)."""
        all_scores = self.comm.gather(raw_scores.to(self.device))  # rows numbered over the global batch
        bad = (~torch.isfinite(all_scores)).nonzero().flatten().tolist()
        why = f"the reward was {all_scores[bad[0]].item()} for completion(s) {bad}"
        warnings.warn(f"step {self.step_count + 1} skipped: {why}", stacklevel=4)
        self.progress.step += 1
        self.faults.record(True, why, self.step_count)
        finite = all_scores[torch.isfinite(all_scores)]
        return {"env/reward_mean": finite.mean().item() if len(finite) else math.nan, "objective/kl": math.nan,
                "objective/kl_coef": self.kl_ctl.value, "faults/skipped_steps": float(self.faults.skipped_steps)}

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        """Run steps up to `steps` over the prompts (continuing a checkpoint when `resume` says so); metrics to
        OUTPUT_DIR/metrics.jsonl and the console; checkpoints, final policy and report at the end."""
        with hold_output_dir(self.config.output_dir, self.comm.is_main):  # a second run there is refused
            return self._train()

    def _train(self) -> list[dict[str, float]]:
        c, comm = self.config, self.comm
        if self.prompts is None or self.reward is None:
            raise ValueError("train() needs prompts and a reward (config keys `prompts` and `reward`, "
                             "or the PPOTrainer arguments)")
        self.resume()
        history = []
        # several processes: each generates and scores its rows; the main process writes
        with RunLogger(c, total=c.steps, start=self.step_count) if comm.is_main else nullcontext(NoLog()) as run:
            run.record(0, maybe_evaluate(self, fresh_start=True))  # held-out prompts, before any update
            while self.step_count < c.steps:
                t0 = time.perf_counter()
                got = collect(self)  # 1-2
                gen, t_gen = got.generation, time.perf_counter() - t0
                stats, kl_per_seq = self._step(gen.queries, gen.responses, got.scores, got.keep, gen.logprobs)  # 3-7
                stats.update({**got.stats, **maybe_evaluate(self)})
                rows = comm.gather_lists(list(zip(got.shown, gen.texts, got.scores.tolist(), kl_per_seq.tolist(),
                                                  map(len, gen.responses))))  # every process's rollouts, once
                *logged, lengths = zip(*rows)
                stats.update({"time/generate": t_gen, "time/step": time.perf_counter() - t0,
                              "throughput/tokens_per_s": sum(lengths) / (time.perf_counter() - t0)})
                run.log(self.step_count, stats, *logged)
                history.append(stats)
                if self.step_count == c.steps or (c.checkpoint_every and self.step_count % c.checkpoint_every == 0):
                    self.save_checkpoint()
            whole = self.ranks.full_state_dict(self.trainable)  # sharded parameters: gathered by all processes
            if comm.is_main:
                self.save(Path(c.output_dir) / "policy", whole)
        if comm.is_main:
            build_report(c.output_dir)
        comm.wait()
        return history

    def resume(self) -> None:
        """Load the latest checkpoint in output_dir as the `resume` key says (train() calls it)."""
        maybe_resume(self.config, self.ranks, self.trainable, self.parts)
        self.engine.weights_changed()  # the engine generates with the restored weights

    def save_checkpoint(self) -> Path:
        """On several processes every process must call it (it gathers each one's random state)."""
        return write_checkpoint(self.config, self.ranks, self.trainable, self.parts)

    def save(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """The policy as a folder AutoModelForCausalLM loads (LoRA merged in; the adapter alone in
        DIRECTORY/adapter), and a separate critic in DIRECTORY/critic. state_dict: the trained module's whole
        weights (`Ranks.full_state_dict`) when its own parameters are shards."""
        save_trained(Path(directory), self.policy, self.critic, self.peft, self.tokenizer, state_dict)

    # ---- internals ------------------------------------------------------------------------
    @property
    def _per_process(self) -> str:
        n = self.comm.num
        return "" if n == 1 else f" / {n} processes = {self.local_batch} per process"


def _autocast(dtype: torch.dtype | None, forward, *args):
    """forward(*args) under autocast to `dtype` on the arguments' device (None: as is, fp32)."""
    if dtype is None:
        return forward(*args)
    with torch.autocast(args[0].device.type, dtype=dtype):
        return forward(*args)
