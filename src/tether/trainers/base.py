"""The steps every tether trainer shares; `step` reads as DESIGN.md's numbered data flow:

    1 generate -> 2 score -> 3 forward -> 4 shape -> 5 advantages -> 6 optimise -> 7 control

An algorithm (ppo.py, grpo.py, rloo.py, reinforce_pp.py) only says how step 5 turns scores and the KL into
per-token advantages, and whether it trains a critic. Rollouts, masks, the KL, the clipped policy loss,
guards, checkpoints and logging are the same code for all of them. Step 6 (the updates) is in optimise.py.
"""

import copy
import logging
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor
from transformers import get_scheduler

from tether.config import PPOConfig
from tether.data import load_prompts
from tether.distributed import Ranks, check_sizes, rank_seed
from tether.losses.ppo import explained_variance
from tether.models.policy import (
    Trained,
    context_length,
    response_forward,
    state_dict_part,
)
from tether.models.rewards import accepted_keywords, score_batch
from tether.ops import gather_logprobs, get_estimator, masked_mean, masked_whiten
from tether.ops.kl_control import AdaptiveKLController, FixedKLController
from tether.ops.logprobs import token_stats
from tether.ops.masks import response_mask
from tether.ops.rewards import RunningMoments
from tether.report import build_report
from tether.rollout import Sampler
from tether.trainers.assemble import build_models
from tether.trainers.batching import left_pad, right_pad
from tether.trainers.checkpoint import maybe_resume, write_checkpoint
from tether.trainers.guards import FaultCounter, warn_if_negative_kl
from tether.trainers.optimise import Optimise
from tether.trainers.rollouts import Generation, Scored
from tether.trainers.run import RunLogger
from tether.trainers.setup import (
    autocast_dtype,
    check_compile,
    check_token_rows,
    eos_ids,
    ended,
    eos_rate,
    keep_freed_memory,
    load_tokenizer,
    make_adamw,
    seed_everything,
)

log = logging.getLogger("tether")


class RLTrainer(Optimise):
    algorithm: str  # the PPOConfig.algorithm this trainer runs
    uses_critic: bool = False

    def __init__(self, config: PPOConfig, model=None, tokenizer=None, prompts=None, reward=None,
                 ref_model=None, logits_processors=()) -> None:
        """model / prompts / reward override the config's keys; ref_model defaults to a frozen copy of the
        policy as it is at the start; logits_processors: extra transformers processors, replayed when scoring."""
        self.config = c = config
        if c.algorithm != self.algorithm:
            raise ValueError(f"{type(self).__name__} runs algorithm={self.algorithm!r} but the config says "
                             f"{c.algorithm!r}; build the config with PPOConfig(algorithm={self.algorithm!r}, ...)")
        if c.lora_r and ref_model is not None:
            raise ValueError("with lora_r > 0 the reference is the policy with its adapters disabled; "
                             "ref_model cannot be given as well")
        self.ranks = Ranks(cpu=c.device == "cpu")
        if c.lora_r and self.ranks.sharded:
            raise ValueError("LoRA (lora_r > 0) with sharded parameters (DeepSpeed ZeRO-3, FSDP) is not supported "
                             "yet: run LoRA on DDP or ZeRO-2; the adapter is small and the frozen base needs no "
                             "optimiser state")
        # Sizes in the config are global; this process holds local_batch rollouts and local_minibatch rows of each
        # minibatch (whole groups of num_generations each).
        self.local_batch, self.local_minibatch = check_sizes(c.batch_size, c.minibatch_size, self.ranks.num,
                                                             c.gradient_accumulation_steps, c.num_generations)
        self.device = self.ranks.device or torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device)
        self.autocast_dtype = autocast_dtype(c.precision, self.device)
        if c.compile:
            check_compile(self.device, self.ranks.sharding if self.ranks.sharded else "")
        if c.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        seed_everything(c.seed)
        self.tokenizer = load_tokenizer(tokenizer, model if model is not None else c.model)
        self.prompts = load_prompts(prompts if prompts is not None else c.prompts, c.prompt_column) \
            if (prompts is not None or c.prompts) else None
        m = build_models(c, self.ranks, self.device, self.autocast_dtype, self.uses_critic, self.tokenizer, model,
                         ref_model, reward, self.local_batch)
        self.policy, self.critic, self.ref, self.peft, self.reward = m.policy, m.critic, m.ref, m.peft, m.reward
        self.vocab_size = m.vocab_size
        self.reward_keywords = accepted_keywords(self.reward) if self.reward is not None else ()
        self.trainable = Trained(self.policy, self.critic)  # everything trained, as one module: checkpoints hold this
        self.eos_token_ids = eos_ids(self.tokenizer, self.policy.model)
        self.sampler = Sampler(self.eos_token_ids, c.temperature, c.top_k, c.top_p, c.min_new_tokens,
                               c.repetition_penalty, c.no_repeat_ngram_size, logits_processors)
        self.encoded_prompts = [self._encode(p, f"prompt row {i}") for i, p in enumerate(self.prompts or [])]

        self.estimator = get_estimator(c.kl_estimator)
        self.kl_ctl = (AdaptiveKLController(c.init_kl_coef, c.kl_target, c.kl_horizon) if c.adaptive_kl
                       else FixedKLController(c.init_kl_coef))
        self.score_moments = RunningMoments()
        self.optimizer = make_adamw([p for p in self.trainable.parameters() if p.requires_grad], lr=c.learning_rate,
                                    weight_decay=c.weight_decay, eps=c.adam_eps)
        updates = c.steps * c.ppo_epochs * (c.batch_size // c.minibatch_size)
        self.scheduler = get_scheduler(c.lr_scheduler_type, self.optimizer, num_warmup_steps=c.warmup_steps,
                                       num_training_steps=updates)
        # Forward passes that train go through this: DDP, a DeepSpeed engine or FSDP on several processes.
        self.trainable_forward = self.ranks.prepare(self.trainable, self.optimizer, c.minibatch_size,
                                                    c.gradient_accumulation_steps, c.max_grad_norm, ["rollout"])
        if c.compile:  # lazily: the first scoring pass and the first update compile (one graph each, grad or not)
            log.info("compile=true: the first step compiles the trained forward pass; later steps reuse it")
            self.trainable_forward = torch.compile(self.trainable_forward)
        # Clipped apart: a separate critic's large early gradients must not shrink the policy's step. Taken after
        # `prepare`, which may replace the parameters (FSDP's are sharded); DeepSpeed clips with its own norm.
        self.clip_groups = [[p for p in m.parameters() if p.requires_grad]
                            for m in ([self.policy, self.critic] if self.critic is not None else [self.policy])]
        self.sample_generator = torch.Generator(self.device).manual_seed(rank_seed(c.seed, self.ranks.rank))
        self.shuffle_generator = torch.Generator().manual_seed(c.seed + 1)  # minibatch partitions
        self.data_generator = torch.Generator().manual_seed(c.seed + 2)  # prompt order
        self._order: list[int] = []  # prompt indices still to visit in this pass
        self.step_count = 0
        self.support_flips = 0  # sampled tokens that replay put outside the sampler's support (round-off)
        self.faults = FaultCounter(c.max_faults_in_row)

    def autocast(self):
        """bf16 autocast for forward passes when `precision` says so; a no-op in fp32."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- step API -----------------------------------------------------------------------------
    def generate(self, queries: list[str] | list[Tensor]) -> Generation:
        """1. Sample one completion per query with the configured sampler."""
        if len(queries) == 0:
            raise ValueError("generate needs at least one query")
        query_tensors = [q if isinstance(q, Tensor) else self._encode(q, f"query {i}") for i, q in enumerate(queries)]
        check_token_rows(query_tensors, "query", self.vocab_size)
        ids, mask = left_pad(query_tensors, self.tokenizer.pad_token_id)
        with self.autocast():
            rollout = self.trainable.rollout(self.sampler, ids.to(self.device), mask.to(self.device),
                             self.config.max_new_tokens, self.tokenizer.pad_token_id, self.sample_generator,
                             # sharded parameters: every process runs every decoding step until all are done
                             all_done=self._all_done if self.ranks.sharded else None)
        lengths = rollout.response_mask.sum(-1).long().tolist()
        responses = [rollout.response_ids[i, :n].cpu() for i, n in enumerate(lengths)]
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return Generation([q.cpu() for q in query_tensors], responses, texts)

    def step(self, queries: list[Tensor], responses: list[Tensor], scores) -> dict[str, float]:
        """2-7. One update on rollouts sampled by `generate` (token ids, not re-tokenised text). With
        num_generations = G > 1, rows k*G .. k*G + G - 1 must be completions of the same prompt."""
        t0 = time.perf_counter()
        c = self.config
        if not (len(queries) == len(responses) == self.local_batch):
            raise ValueError(f"step got {len(queries)} queries and {len(responses)} responses; both must equal "
                             f"batch_size={c.batch_size}{self._per_process}")
        check_token_rows(queries, "query", self.vocab_size)
        check_token_rows(responses, "response", self.vocab_size)
        self._check_groups(queries)
        raw_scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        if len(raw_scores) != self.local_batch:
            raise ValueError(f"step got {len(raw_scores)} scores; it needs "
                             f"batch_size={c.batch_size}{self._per_process}")
        if self.ranks.any(not torch.isfinite(raw_scores).all()):  # skipped on every process together
            return self._skip_step(raw_scores)
        # TRL's missing_eos_penalty: a completion cut at max_new_tokens scores less than the reward said
        scores = raw_scores - c.missing_eos_penalty * (~ended(responses, self.eos_token_ids)).float()
        batch = self._forward_rollouts(queries, responses)  # 3
        t_score = time.perf_counter()
        beta = self.kl_ctl.value
        advantages, returns, non_score = self.advantages(  # 4-5
            batch, self._process_scores(scores).to(self.device), 0.0 if c.kl_in_loss else beta)
        if c.whiten_advantages:  # over the global batch: every process's tokens
            advantages = masked_whiten(advantages, batch.mask, all_reduce=self.ranks.all_reduce)
        t_optimise = time.perf_counter()
        train_stats = self._optimise(batch, advantages, returns, beta)  # 6
        t_optimise = time.perf_counter() - t_optimise
        # Chain rule: sum_t KL(pi(.|s_t) || ref(.|s_t)) along sampled trajectories is an unbiased,
        # never-negative estimate of the sequence-level KL (the sampled estimators' Rao-Blackwellisation).
        kl_per_seq = batch.kl_exact.sum(-1)
        self._last_kl_per_seq = kl_per_seq.tolist()
        g = self.ranks  # per-row values of every process, then token means over every process's tokens
        raw_all, scores_all, kl_all, estimate_all, non_score_all, length_all = g.gather(torch.stack(
            [raw_scores.to(self.device), scores.to(self.device), kl_per_seq, batch.kl.sum(-1), non_score.sum(-1),
             batch.mask.sum(-1)], 1)).T
        self.kl_ctl.update(kl_all.mean().item(), c.batch_size)  # 7
        self.step_count += 1

        def token_mean(x: Tensor) -> float:
            return masked_mean(x, batch.mask, all_reduce=g.all_reduce).item()

        def process_sum(x: float) -> float:
            return g.all_reduce(torch.tensor([x], dtype=torch.float64, device=self.device)).item()

        stats = {
            "env/reward_mean": raw_all.mean().item(),  # what the reward said
            "env/reward_std": raw_all.std().item() if len(raw_all) > 1 else 0.0,
            "objective/kl": kl_all.mean().item(),
            "objective/kl_estimate": estimate_all.mean().item(),
            "objective/kl_coef": beta,
            "objective/entropy": token_mean(batch.entropy),
            "objective/scores": scores_all.mean().item(),  # after missing_eos_penalty
            "objective/non_score_reward": non_score_all.mean().item(),
            "ppo/advantages/mean": token_mean(advantages),
            **({"ppo/returns/mean": token_mean(returns),  # how well the rollout-time values predicted the returns
                "ppo/val/var_explained": explained_variance(batch.values, returns, batch.mask, g.all_reduce).item()}
               if returns is not None else {}),
            "ppo/learning_rate": self.scheduler.get_last_lr()[0],
            "tokens/response_len_mean": length_all.mean().item(),
            "tokens/eos_rate": process_sum(eos_rate(batch.response_ids, batch.mask, self.eos_token_ids)) / g.num,
            "rollout/support_flips": process_sum(float(self.support_flips)),
            **train_stats,
            "time/score": t_score - t0,
            "time/optimise": t_optimise,
            "time/step": time.perf_counter() - t0,
        }
        warn_if_negative_kl(estimate_all, self.step_count)
        self.faults.record(train_stats["faults/skipped_minibatches"] > 0, "a minibatch loss or gradient was nan/inf",
                           self.step_count)
        stats["faults/skipped_steps"] = float(self.faults.skipped_steps)
        return stats

    def advantages(self, batch: Scored, scores: Tensor, kl_coef: float) -> tuple[Tensor, Tensor | None, Tensor]:
        """4-5. Processed scores (B,) and the KL (with its coefficient in the reward: 0 when the KL is in the
        loss) -> advantages (B, T), value targets (B, T) or None without a critic, and the per-token non-score
        reward (B, T). Whitening (whiten_advantages) follows in `step`."""
        raise NotImplementedError

    def _check_groups(self, queries: list[Tensor]) -> None:
        G = self.config.num_generations
        for start in range(0, len(queries), G):
            first = queries[start]
            for i in range(start + 1, start + G):
                if not torch.equal(queries[i], first):
                    raise ValueError(f"num_generations={G}: rows {start}..{start + G - 1} must be completions of "
                                     f"one prompt, but query {i} differs from query {start}")

    def _skip_step(self, raw_scores: Tensor) -> dict[str, float]:
        """A nan/inf score (on any process): no update at all this step (the weights are untouched)."""
        all_scores = self.ranks.gather(raw_scores.to(self.device))  # rows numbered over the global batch
        bad = (~torch.isfinite(all_scores)).nonzero().flatten().tolist()
        why = f"the reward was {all_scores[bad[0]].item()} for completion(s) {bad}"
        warnings.warn(f"step {self.step_count + 1} skipped: {why}", stacklevel=3)
        self.step_count += 1
        self._last_kl_per_seq = [math.nan] * len(raw_scores)
        self.faults.record(True, why, self.step_count)
        finite = all_scores[torch.isfinite(all_scores)]
        return {"env/reward_mean": finite.mean().item() if len(finite) else math.nan, "objective/kl": math.nan,
                "objective/kl_coef": self.kl_ctl.value, "faults/skipped_steps": float(self.faults.skipped_steps)}

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        """Run PPO steps up to `steps` over the prompts (continuing a checkpoint when `resume` says so);
        metrics to OUTPUT_DIR/metrics.jsonl and the console; checkpoints, final policy and report at the end."""
        c = self.config
        if self.prompts is None or self.reward is None:
            raise ValueError("train() needs prompts and a reward (config keys `prompts` and `reward`, "
                             "or the PPOTrainer arguments)")
        self._maybe_resume()
        history = []
        g = self.ranks  # several processes: each generates and scores its rows; the main process writes
        with RunLogger(c, total=c.steps, start=self.step_count) if g.is_main else nullcontext(_NoLog()) as run:
            while self.step_count < c.steps:
                t0 = time.perf_counter()
                indices = [i for i in self._next_prompt_indices() for _ in range(c.num_generations)]
                indices = indices[g.rank * self.local_batch:(g.rank + 1) * self.local_batch]
                prompts = [self.prompts[i] for i in indices]
                gen = self.generate([self.encoded_prompts[i] for i in indices])  # 1
                t_gen = time.perf_counter() - t0
                info = {"ended": ended(gen.responses, self.eos_token_ids).tolist(),
                        "completion_tokens": [len(r) for r in gen.responses]}
                scores = score_batch(self.reward, prompts, gen.texts, {k: info[k] for k in self.reward_keywords})  # 2
                stats = self.step(gen.queries, gen.responses, scores)  # 3-7
                rows = g.gather_lists(list(zip(prompts, gen.texts, map(float, scores), self._last_kl_per_seq,
                                               map(len, gen.responses))))  # every process's rollouts, once
                *logged, lengths = zip(*rows)
                stats.update({"time/generate": t_gen, "time/step": time.perf_counter() - t0,
                              "throughput/tokens_per_s": sum(lengths) / (time.perf_counter() - t0)})
                run.log(self.step_count, stats, *logged)
                history.append(stats)
                if self.step_count == c.steps or (c.checkpoint_every and self.step_count % c.checkpoint_every == 0):
                    self.save_checkpoint()
            whole = g.full_state_dict(self.trainable)  # sharded parameters: gathered by all processes
            if g.is_main:
                self.save(Path(c.output_dir) / "policy", whole)
        if g.is_main:
            build_report(c.output_dir)
        g.wait()
        return history

    def save_checkpoint(self) -> Path:
        """On several processes every process must call it (it gathers each one's random state)."""
        return write_checkpoint(self)

    def _maybe_resume(self) -> None:
        maybe_resume(self)

    def save(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """The policy as a folder AutoModelForCausalLM loads (LoRA merged in; the adapter alone in
        DIRECTORY/adapter), and a separate critic in DIRECTORY/critic. state_dict: the trained module's whole
        weights (`Ranks.full_state_dict`) when its own parameters are shards."""
        directory = Path(directory)

        def part(prefix: str) -> dict[str, Tensor] | None:
            return None if state_dict is None else state_dict_part(state_dict, prefix)

        if self.peft is None:
            self.policy.save_pretrained(directory, self.tokenizer, state_dict=part("policy."))
        else:
            self.peft.save_pretrained(directory / "adapter")
            merged = copy.deepcopy(self.peft).merge_and_unload()
            self.policy.save_pretrained(directory, self.tokenizer, model=merged)
        if self.critic is not None:
            self.critic.save_pretrained(directory / "critic", state_dict=part("critic."))

    def _reference_forward(self, q_ids: Tensor, q_mask: Tensor, r_ids: Tensor) -> Tensor:
        """Reference logits (B, T, V): the frozen copy, or with LoRA the policy with its adapters off."""
        if self.peft is None:
            return response_forward(self.ref, q_ids, q_mask, r_ids)[0]
        with self.peft.disable_adapter():
            return response_forward(self.policy.model, q_ids, q_mask, r_ids)[0]

    def _logits_and_values(self, q_ids: Tensor, q_mask: Tensor, r_ids: Tensor) -> tuple[Tensor, Tensor | None]:
        with self.autocast():
            return self.trainable_forward(q_ids, q_mask, r_ids)

    def _all_done(self, finished: Tensor) -> bool:
        """Whether every process's rows have all ended."""
        return self.ranks.all(bool(finished.all()))

    @property
    def _per_process(self) -> str:
        n = self.ranks.num
        return "" if n == 1 else f" / {n} processes = {self.local_batch} per process"

    # ---- internals ------------------------------------------------------------------------
    @torch.no_grad()
    def _forward_rollouts(self, queries: list[Tensor], responses: list[Tensor]) -> Scored:
        """3. Policy log-probs and values, reference log-probs, KL; in micro-batch chunks (bounded memory)."""
        pad = self.tokenizer.pad_token_id
        q_ids, q_mask = (t.to(self.device) for t in left_pad(queries, pad))
        r_ids, r_len_mask = (t.to(self.device) for t in right_pad(responses, pad))
        mask = response_mask(r_ids, self.eos_token_ids) * r_len_mask
        parts = []
        micro = self.local_minibatch // self.config.gradient_accumulation_steps
        for idx in torch.arange(len(queries), device=self.device).split(micro):
            logits, values = self._logits_and_values(q_ids[idx], q_mask[idx], r_ids[idx])
            scores = self._replay(logits, q_ids[idx], q_mask[idx], r_ids[idx])
            with self.autocast():
                ref_logits = self._reference_forward(q_ids[idx], q_mask[idx], r_ids[idx])
            ref_scores = self.sampler.reference_scores(ref_logits)
            stats = token_stats(scores, ref_scores, r_ids[idx])  # one log-softmax per side for all four
            flipped = ~torch.isfinite(stats.logprobs) & mask[idx].bool()
            self.support_flips += int(flipped.sum())
            logprobs = self._sampled_logprobs(logits, stats.logprobs, r_ids[idx], flipped)
            kl = self.estimator.fn(self._kl_logprobs(logits, logprobs, r_ids[idx]) if self.config.kl_in_loss
                                   else logprobs, stats.ref_logprobs)
            parts.append((logprobs, stats.ref_logprobs, values, kl, stats.kl, stats.entropy, flipped))
        # where, not multiply: after-EOS padding can score -inf under top-k replay, and -inf * 0 is nan
        *tensors, flipped = (torch.cat(p) if p[0] is not None else None for p in zip(*parts))
        logprobs, ref_logprobs, values, kl, kl_exact, entropy = (
            None if t is None else torch.where(mask.bool(), t, 0.0) for t in tensors)
        return Scored(q_ids, q_mask, r_ids, mask, logprobs, ref_logprobs, values, kl, kl_exact, entropy, flipped)

    def _sampled_logprobs(self, logits: Tensor, logprobs: Tensor, r_ids: Tensor, flipped: Tensor) -> Tensor:
        """log pi(a_t | s_t) under the processed scores (`logprobs`). A token sampled right at a top-k / top-p
        boundary can land outside the replayed support by float round-off (cached vs teacher-forced forward): it
        is scored untruncated instead of -inf, at rollout time and in every update alike, so its ratio starts
        at 1."""
        if flipped.any():
            logprobs = torch.where(flipped, gather_logprobs(self.sampler.reference_scores(logits), r_ids), logprobs)
        return logprobs

    def _kl_logprobs(self, logits: Tensor, logprobs: Tensor, r_ids: Tensor) -> Tensor:
        """log pi_T(a_t | s_t), the policy at the sampling temperature, untruncated: what the KL term of the loss
        compares with the reference (`losses.ppo.kl_penalty` says why). `logprobs` (the sampling-processed
        log-probs) already are that when the sampler does nothing beyond the temperature."""
        if self.sampler.only_temperature:
            return logprobs
        return gather_logprobs(self.sampler.reference_scores(logits), r_ids)

    def _replay(self, logits: Tensor, q_ids: Tensor, q_mask: Tensor, r_ids: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V) -> the scores the sampler drew from (B, T, V)."""
        ids = torch.cat([q_ids, r_ids], 1)
        return self.sampler.sequence_scores(logits, ids, torch.cat([q_mask, torch.ones_like(r_ids)], 1))

    def _process_scores(self, scores: Tensor) -> Tensor:
        c = self.config
        scores = scores * c.score_scale
        if c.score_norm:  # the same statistics on every process: from all processes' scores
            self.score_moments.update(self.ranks.gather(scores.to(self.device)))
            scores = (scores - self.score_moments.mean) / max(self.score_moments.std, 1e-8)
        if c.score_clip is not None:
            scores = scores.clamp(-c.score_clip, c.score_clip)
        return scores

    def _next_prompt_indices(self) -> list[int]:
        """batch_size / num_generations prompts: a seeded shuffle, reshuffled on each pass over the data."""
        n = self.config.batch_size // self.config.num_generations
        while len(self._order) < n:
            self._order += torch.randperm(len(self.prompts), generator=self.data_generator).tolist()
        indices, self._order = self._order[:n], self._order[n:]
        return indices

    def _encode(self, text: str, where: str) -> Tensor:
        ids = torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.long)
        context = context_length(self.policy.model.config)
        if len(ids) == 0:
            raise ValueError(f"{where} {text!r} tokenises to no tokens")
        if context is not None and len(ids) + self.config.max_new_tokens > context:
            raise ValueError(f"{where} is {len(ids)} tokens; with max_new_tokens={self.config.max_new_tokens} that "
                             f"exceeds the model's context of {context} tokens. Shorten the prompt or lower "
                             f"max_new_tokens. Prompt starts: {text[:80]!r}")
        return ids


def sequence_advantages(batch: Scored, scores: Tensor, kl_coef: float, baseline) -> tuple[Tensor, None, Tensor]:
    """For the group estimators (grpo, rloo): sequence reward = score - kl_coef * sum_t KL_t, `baseline` maps
    the (B,) rewards to (B,) advantages, and each completion's advantage goes on every one of its tokens."""
    non_score = -kl_coef * batch.kl * batch.mask
    advantages = baseline(scores + non_score.sum(-1))
    return advantages[:, None] * batch.mask, None, non_score


TRAINERS: dict[str, str] = {"ppo": "tether.trainers.ppo:PPOTrainer", "grpo": "tether.trainers.grpo:GRPOTrainer",
                            "rloo": "tether.trainers.rloo:RLOOTrainer",
                            "reinforce++": "tether.trainers.reinforce_pp:ReinforcePPTrainer"}


def trainer_class(algorithm: str) -> type[RLTrainer]:
    """The trainer class for a PPOConfig.algorithm."""
    import importlib

    module, name = TRAINERS[algorithm].split(":")
    return getattr(importlib.import_module(module), name)


class _NoLog:
    """The run logger of a process other than the main one."""

    def log(self, *args) -> None:
        pass
