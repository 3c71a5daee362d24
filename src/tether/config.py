"""Typed configuration. One flat set of keys, the same in Python, YAML and on the command line.

Every value is checked once, at construction; a config is never changed after that.
"""

import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal

from tether.algorithms import ALGORITHMS
from tether.config_checks import config_errors
from tether.ops.kl import BIASED_IN_REWARD

# `full` parses so that the config can say why it is refused (ops.kl.FULL_REFUSED).
KLEstimatorName = Literal["kl", "k1", "abs", "mse", "k2", "k3", "full"]


@dataclass(frozen=True)
class PPOConfig:
    algorithm: str = "ppo"
    """ppo (GAE with a critic), or critic-free: grpo (group mean/std), rloo (leave-one-out baseline),
    reinforce++ (batch-normalised returns), or any method added to tether.algorithms.ALGORITHMS. `tether grpo`
    etc. set it; it picks the defaults of the keys left unset (num_generations, kl_in_loss, whiten_advantages)."""

    # --- what to train, on what, against what --------------------------------------------
    model: str = ""
    """Policy: a hub name or a local folder for AutoModelForCausalLM (a module can be passed to PPOTrainer instead)."""
    prompts: str | None = None
    """Prompt data: a JSONL or CSV file with a `prompt` column, or `package.module:function` returning a list of
    strings or a Dataset (the demo's: tether.demo:movie_review_openings); the Python API also takes a list or a
    Dataset."""
    prompt_column: str = "prompt"
    """Column holding each row's prompt in the prompt file or Dataset: a string, or a conversation (a list of
    chat messages `{"role": ..., "content": ...}`, rendered with the tokenizer's chat template and the generation
    prompt). Left at `prompt`, a `messages` column is used when there is no `prompt` one. The other columns go
    to the reward by keyword."""
    chat_template: str | None = None
    """Chat template for conversation prompts, replacing the tokenizer's own: a Jinja template file, or the name
    of one shipped with tether (chatml). Unset: the tokenizer's template; conversations given to a tokenizer
    without one are refused before any model loads."""
    reward: str | None = None
    """Reward: `package.module:function` taking (prompts, completions) -> list of floats (and, by keyword if
    it names them or takes **kwargs, `ended` and `completion_tokens` per completion and any other column of the
    prompt row, such as `answer`), a folder with a sequence-classification reward model, or a .yaml reward spec
    combining several with weights (docs/rewards.md); the Python API also takes a callable. Built-in verifiers:
    tether.rewards.verifiable:exact_match, :numeric_answer, :math_answer, :format_reward."""
    eval_prompts: str | None = None
    """Held-out prompts (same formats and columns as `prompts`, never trained on): their completions (greedy, or
    see eval_sampling) are scored by the reward before the first step, every eval_every steps and after the last,
    logged as
    eval/reward_mean (the accuracy, for a 0/1 verifier) and eval/reward/<name>_mean."""
    eval_every: int = 0
    """With eval_prompts: evaluate every this many steps as well (0 = only before the first and after the last)."""
    eval_sampling: Literal["greedy", "train"] = "greedy"
    """How eval_prompts are answered: greedy (the argmax token each step), or train (sampled as training samples:
    temperature, top_k, top_p and the other sampling keys), on the evaluation's own generator either way."""
    output_dir: str = "runs/ppo"
    """Run folder: metrics.jsonl, samples, resolved config, final policy."""
    seed: int = 0
    """Seed for data order, sampling and minibatch shuffling."""

    # --- sizes -----------------------------------------------------------------------------
    steps: int = 20
    """Number of PPO steps (each: one batch of rollouts, then ppo_epochs of optimisation)."""
    batch_size: int = 16
    """Rollouts (prompt + completion) per step: batch_size / num_generations prompts, each sampled
    num_generations times."""
    num_generations: int | None = None
    """Completions per prompt in each step (default: 1 for ppo and reinforce++, 4 for grpo and rloo); must
    divide batch_size. grpo and rloo need >= 2; reinforce++ with >= 2 subtracts each prompt's mean score."""
    minibatch_size: int = 4
    """Rollouts per optimiser step; must divide batch_size."""
    ppo_epochs: int = 4
    """Passes over each batch of rollouts."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch (same update, less memory); must divide minibatch_size."""

    # --- optimiser -------------------------------------------------------------------------
    learning_rate: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_eps: float = 1e-5
    """AdamW epsilon. 1e-5 as in OpenAI baselines' PPO: with 1e-8, output-embedding rows of tokens that are
    almost never sampled (tiny gradients) still take full-size steps, moving every logit at once."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    lr_scheduler_type: str = "constant"
    """A transformers scheduler name: constant, linear, cosine, ... (over steps * updates per step)."""
    warmup_steps: int = 0
    """Optimiser steps of linear warm-up (for schedulers that use it)."""

    # --- generation (every setting here is replayed when scoring) ---------------------------
    max_new_tokens: int = 32
    """Most tokens sampled per completion."""
    min_new_tokens: int = 0
    """EOS is suppressed until this many tokens are sampled (replayed when scoring)."""
    temperature: float = 1.0
    """Sampling temperature; the reference is scored at the same temperature."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set with this much probability (1 = off)."""
    repetition_penalty: float = 1.0
    """CTRL repetition penalty (1 = off)."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of this size (0 = off)."""
    generation_kwargs: dict = field(default_factory=dict)
    """Other `generate` settings. Only listed so that settings tether cannot replay (beam search, greedy,
    contrastive search, ...) are refused by name rather than ignored."""

    # --- rollout engine (docs/vllm.md) ---------------------------------------------------------
    rollout_engine: Literal["tether", "vllm"] = "tether"
    """Who samples: tether (its own decoding loop) or vllm (a vLLM engine in the trainer's process, `pip install
    'tether[vllm]'`, fed the trained weights before each generation that follows an update). Either way the trainer
    replays the sampling settings on its own logits to score the tokens."""
    vllm_gpu_memory_utilization: float = 0.3
    """With vllm: the share of the GPU's memory vLLM takes for weights and KV cache (TRL's colocate default);
    unused on the CPU, where VLLM_CPU_KVCACHE_SPACE (GiB) sizes the cache."""
    vllm_max_model_len: int | None = None
    """With vllm: the longest prompt + completion the engine serves (default: longest prompt + max_new_tokens)."""
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """With vllm: the engine's weights and arithmetic; auto follows `precision` (fp32: float32, bf16: bfloat16)."""
    vllm_enforce_eager: bool = False
    """With vllm: no CUDA graphs or compilation (the engine builds in seconds, decodes slower on a GPU)."""
    rollout_correction: Literal["none", "tis", "mis"] | None = None
    """Importance weights pi_trainer / pi_engine on the policy loss for the engine/trainer log-prob gap: tis
    truncates them at rollout_correction_cap, mis drops tokens (or sequences) above it (Yao et al. 2025). Default:
    tis with vllm, none with tether (its log-probs are the trainer's own)."""
    rollout_correction_level: Literal["token", "sequence"] = "token"
    """One weight per token, or per sequence (the product of its tokens' weights)."""
    rollout_correction_cap: float = 2.0
    """The cap C of rollout_correction (2 in Yao et al. 2025 and veRL; TRL uses 3 for sequence masking)."""

    # --- KL tether ------------------------------------------------------------------------
    kl_in_loss: bool | None = None
    """Where the KL tether acts: false puts -beta * KL in the reward (ppo, rloo, reinforce++ default), true
    adds beta * KL to the loss at every update (grpo default)."""
    kl_estimator: KLEstimatorName | None = None
    """Per-token KL estimator on the sampled tokens: kl (k1), abs, mse (k2) or k3. Default: kl in the reward
    (the only one whose policy gradient there is the KL's; the others warn), k3 in the loss. The exact KL over
    the vocabulary is always reported (objective/kl) and steered by adaptive_kl; as a reward (`full`) it
    gives the sampled token no gradient and is refused."""
    init_kl_coef: float = 0.05
    """beta in R = r - beta * KL (the starting value when adaptive_kl)."""
    adaptive_kl: bool = False
    """Adapt beta toward kl_target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target objective/kl for the adaptive controller."""
    kl_horizon: float = 10000.0
    """Horizon (in episodes) of the adaptive controller."""

    # --- rewards and advantages -------------------------------------------------------------
    score_scale: float = 1.0
    """Multiply every score by this before use."""
    score_norm: bool = False
    """Divide scores by their running std (and remove the running mean) across steps."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of every completion that did not end with EOS (cut at max_new_tokens), in the
    reward's units, before score_scale / score_norm / score_clip; 0 = off. As TRL's missing_eos_penalty and
    the N+ implementation details' penalty for unfinished completions."""
    score_clip: float | None = None
    """Clip (processed) scores to [-score_clip, score_clip]."""
    whiten_rewards: bool = False
    """Whiten per-token rewards over the batch (keeping their mean) before GAE."""
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """lambda of GAE."""
    whiten_advantages: bool | None = None
    """Whiten advantages over the batch (default: true for ppo and reinforce++, false for grpo and rloo,
    whose group baselines already centre them)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """grpo's baseline: each reward minus its group's mean, divided by the group's std (group; the GRPO paper),
    by the whole batch's std (batch; TRL's scale_rewards="batch"), or not divided (none; Dr. GRPO)."""
    overlong: Literal["none", "mask", "soft"] = "none"
    """Completions that run long: none; mask (those cut at max_new_tokens without EOS are left out of the loss:
    DAPO's overlong filtering, TRL's mask_truncated_completions); soft (DAPO's soft overlong punishment: the score
    loses overlong_penalty * (length - (max_new_tokens - overlong_buffer)) / overlong_buffer inside the last
    overlong_buffer tokens)."""
    overlong_buffer: int = 0
    """With overlong=soft: how many tokens before max_new_tokens the length penalty starts (0 < it < max_new_tokens)."""
    overlong_penalty: float = 1.0
    """With overlong=soft: the penalty at max_new_tokens, in the reward's units (DAPO: 1)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025): groups whose completions all got the same score (zero advantage:
    nothing to learn) are dropped and more prompts are sampled until the batch is full; needs num_generations >= 2."""
    dynamic_sampling_max_rounds: int = 3
    """The most extra generation rounds per step for dynamic_sampling. When they run out, the batch is filled with
    dropped groups left out of the loss (counted in dynamic_sampling/filled_groups), never trained on."""

    # --- PPO loss ---------------------------------------------------------------------------
    cliprange: float = 0.2
    """Policy ratio clip epsilon: the ratio is clipped to [1 - cliprange_low, 1 + cliprange_high], both cliprange
    unless set."""
    cliprange_low: float | None = None
    """Lower clip epsilon (default: cliprange); < 1. TRL's epsilon."""
    cliprange_high: float | None = None
    """Upper clip epsilon (default: cliprange); above cliprange_low is DAPO's clip-higher (DAPO: 0.28 with 0.2).
    TRL's epsilon_high, veRL's clip_ratio_high. With policy_loss=cispo, the importance weight's cap is
    1 + cliprange_high."""
    dual_clip: float | None = None
    """Dual-clip PPO (Ye et al. 2020): for a negative advantage the loss is at most -A * dual_clip (> 1; veRL's
    clip_ratio_c, 3 there). Unset: off."""
    importance_ratio: Literal["token", "sequence"] = "token"
    """token: one ratio per token (PPO); sequence: GSPO's length-normalised sequence ratio on every token of the
    completion (Zheng et al. 2025; TRL's importance_sampling_level). GSPO's own clip range is small (3e-4 / 4e-4)."""
    policy_loss: Literal["ppo", "cispo"] = "ppo"
    """ppo: the clipped surrogate; cispo: MiniMax-M1's clipped, detached importance weight times the log-prob
    (every token keeps a gradient; TRL's loss_type="cispo")."""
    loss_aggregation: Literal["token_mean", "sequence_mean", "sequence_sum_norm"] = "token_mean"
    """How per-token losses of a minibatch become one: token_mean (every token alike; DAPO, veRL token-mean),
    sequence_mean (per-sequence means, then their mean; the GRPO paper), sequence_sum_norm (per-sequence sums
    divided by loss_norm_constant, then their mean; Dr. GRPO). Applies to every term of the loss."""
    loss_norm_constant: int | None = None
    """The divisor of sequence_sum_norm (default: max_new_tokens)."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus in the loss: minus entropy_coef times the (aggregated) entropy of the sampling
    distribution at every response token; 0 = off (it costs a log-softmax with gradients)."""
    cliprange_value: float = 0.2
    """Value prediction clip around the rollout-time value."""
    vf_coef: float = 0.1
    """Weight of the value loss (ppo)."""
    critic: str = "shared"
    """ppo's value function: shared (a head on the policy's last hidden state), policy (a separate copy of
    the starting policy's body with its own head), reward (the reward model's body and score head; `reward`
    must be a causal-LM reward folder with the policy's tokenizer), or a path to such a folder."""

    # --- memory and precision ----------------------------------------------------------------
    lora_r: int = 0
    """LoRA rank (0 = train all weights). With LoRA the reference is the same model with its adapters
    disabled: no second copy of the weights."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_target_modules: list[str] | None = None
    """Module names to adapt (default: every linear layer except the output head)."""
    gradient_checkpointing: bool = False
    """Recompute each transformer layer in the backward pass instead of storing its activations. The models stay
    in eval mode (dropout off), so what they compute, and the gradients, are the same as without it."""
    logits_chunk_rows: int = 0
    """Positions whose logits exist at once, in scoring and in every update: the LM head is applied to a block of
    this many (batch row, position) pairs, the block's log-probs, entropy and KL are taken, and its logits freed;
    with gradients each block is recomputed in the backward pass. 0: automatic, as many positions as make 2**23
    logits (32 MB in fp32: 55 positions of a 151,936-token vocabulary, 170 of SmolLM2's 49,152). Memory, not
    results: any value gives the same numbers up to float round-off (docs/design.md, "Memory"). Under DeepSpeed
    ZeRO-3 a micro-batch is one block (0 only)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Forward passes in fp32, or under bf16 autocast (trained weights, optimiser and log-prob math stay fp32;
    the frozen reference keeps its linear layers in bf16, which autocast casts them to anyway).
    auto: bf16 on a GPU that supports it, fp32 otherwise."""
    compile: bool = False
    """torch.compile the forward pass that scores rollouts and trains (policy with its value head, and a separate
    critic); generation and the reference stay eager. The first step compiles (about 45 s for SmolLM2-135M on two
    CPU cores, more when prompt or response lengths first change and shapes turn dynamic), then each update runs
    fused kernels: 1.2x per step on SmolLM2-135M under bf16 on the CPU (11.4 -> 9.4 s), 1.04x in fp32. Needs a
    C++ compiler on the CPU. With one process, DDP or DeepSpeed ZeRO-2; refused with ZeRO-3 and FSDP for now."""
    keep_freed_memory: bool = False
    """On the CPU under Linux/glibc, how the process's allocator treats large blocks (process-wide, until the
    process ends). false: every block above 4 MiB is mapped fresh and returned to the system when freed, so the
    resident size follows what is alive; the vocabulary blocks of scoring and the update (`logits_chunk_rows`)
    need that, or the peak grows with their number (measured at 240 response tokens of a 151,936-token
    vocabulary: 0.9 GB, against 2.1-2.3 GB with true). true: keep all freed memory for reuse, which saves
    page-faulting large buffers in again (measured 1.05x per step on SmolLM2-135M in fp32 before the vocabulary
    went into blocks, and within noise since) at a peak that no longer shrinks."""

    # --- reliability --------------------------------------------------------------------------
    checkpoint_every: int = 50
    """Write a checkpoint every this many steps (0 = only at the end); always one at the end."""
    keep_checkpoints: int = 1
    """How many complete checkpoints to keep; an older one is deleted only after a newer one is complete."""
    resume: bool | Literal["auto"] = False
    """Continue from the latest checkpoint in output_dir: true (one must exist), auto (if one exists), false."""
    max_faults_in_row: int = 3
    """Stop after this many steps in a row whose update was skipped for a NaN/inf reward, loss or gradient."""
    ratio_threshold: float = 10.0
    """Skip a minibatch update whose mean PPO ratio exceeds this (a policy that moved too far, too fast)."""

    # --- logging ----------------------------------------------------------------------------
    samples_every: int = 1
    """Write completions to samples.jsonl every this many steps (0 = never)."""
    samples_per_step: int = 8
    """How many completions to write each time."""
    # experiment trackers: Accelerate's tracker classes, fed by the main process (tether.report.trackers)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers that get every step's metrics and the config: any of tensorboard (RUN/tb/), wandb,
    mlflow, trackio, or [none]. Each must be installed (`pip install 'tether[wandb]'`, ...): one that is not is
    refused before anything loads. One that fails mid-run is dropped with a warning; metrics.jsonl is always
    written."""
    tracker_project: str = "tether"
    """The trackers' project: the W&B and Trackio project, the MLflow experiment."""
    run_name: str | None = None
    """The run's name in the trackers (default: the name of output_dir)."""
    tracker_tags: list[str] = field(default_factory=list)
    """Tags for the run in W&B, and in MLflow (as tags set to `true`)."""
    mlflow_tracking_uri: str | None = None
    """Where MLflow records the run: a server (http://...), a database (sqlite:///mlflow.db) or a folder
    (file:/path); unset: MLFLOW_TRACKING_URI, else MLflow's own default."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ..."""

    def __post_init__(self) -> None:
        # Keys left unset (None) take their algorithm's default, resolved once here.
        algorithm = ALGORITHMS.get(self.algorithm)
        for key, value in (algorithm.defaults if algorithm else {}).items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.kl_estimator is None:
            object.__setattr__(self, "kl_estimator", "k3" if self.kl_in_loss else "kl")
        if self.rollout_correction is None:  # on by default where the engine is not the trainer
            object.__setattr__(self, "rollout_correction", "tis" if self.rollout_engine == "vllm" else "none")
        errors = ["cliprange_low with policy_loss=cispo: CISPO caps its importance weight from above only "
                  "(1 + cliprange_high); leave cliprange_low unset"] if (
            self.policy_loss == "cispo" and self.cliprange_low is not None) else []
        for key in ("cliprange_low", "cliprange_high"):  # unset: cliprange
            if getattr(self, key) is None:
                object.__setattr__(self, key, self.cliprange)
        errors += config_errors(self)
        if errors:
            raise ValueError("invalid PPOConfig:\n  - " + "\n  - ".join(errors))
        if not self.kl_in_loss and self.kl_estimator in BIASED_IN_REWARD and self.init_kl_coef > 0:
            warnings.warn(f"kl_estimator={self.kl_estimator} in the reward: its value estimates the KL, but as a "
                          f"reward its policy gradient is not the KL's (biased, at times of the wrong sign); kl "
                          f"(k1) is the estimator that is gradient-correct there (docs/kl.md)", stacklevel=3)

    def to_dict(self) -> dict:
        return asdict(self)
