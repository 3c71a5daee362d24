"""The checks of tether's configs, one message per problem naming the key (PPOConfig calls config_errors once, at
construction; RewardConfig shares the scheduler, device and tracker checks)."""

from dataclasses import fields

import torch
from transformers import SchedulerType

from tether.algorithms import ALGORITHMS
from tether.ops.kl import ESTIMATORS, FULL_REFUSED

_SCHEDULERS = {t.value for t in SchedulerType}


def config_errors(c) -> list[str]:
    """Every problem of a PPOConfig `c` whose unset keys are resolved, as messages naming the key."""
    def positive(name: str) -> None:
        if not getattr(c, name) > 0:
            problems.append(f"{name}={getattr(c, name)!r} must be > 0")

    def non_negative(name: str) -> None:
        if not getattr(c, name) >= 0:
            problems.append(f"{name}={getattr(c, name)!r} must be >= 0")

    def in_unit(name: str, low_open: bool) -> None:
        value = getattr(c, name)
        ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
        if not ok:
            problems.append(f"{name}={value!r} must be in {'(0' if low_open else '[0'}, 1]")

    problems: list[str] = []
    if c.algorithm not in ALGORITHMS:
        return [f"algorithm={c.algorithm!r} is not one of {sorted(ALGORITHMS)}"]
    for name in ("adam_eps", "steps", "batch_size", "minibatch_size", "ppo_epochs", "gradient_accumulation_steps",
                 "max_new_tokens", "learning_rate", "temperature", "cliprange", "cliprange_value",
                 "kl_target", "kl_horizon", "samples_per_step", "keep_checkpoints", "max_faults_in_row", "num_generations",
                 "lora_alpha"):
        positive(name)
    for name in ("min_new_tokens", "top_k", "no_repeat_ngram_size", "init_kl_coef", "vf_coef", "weight_decay",
                 "max_grad_norm", "warmup_steps", "samples_every", "score_scale", "checkpoint_every", "lora_r",
                 "missing_eos_penalty", "eval_every", "logits_chunk_rows"):
        non_negative(name)
    in_unit("top_p", low_open=True)
    in_unit("gamma", low_open=False)
    in_unit("lam", low_open=False)
    if not c.repetition_penalty > 0:
        problems.append(f"repetition_penalty={c.repetition_penalty!r} must be > 0")
    if c.score_clip is not None and not c.score_clip > 0:
        problems.append(f"score_clip={c.score_clip!r} must be > 0 (or unset)")
    if c.kl_estimator == "full":
        problems.append(FULL_REFUSED)
    elif c.kl_estimator not in ESTIMATORS:
        problems.append(f"kl_estimator={c.kl_estimator!r} is not one of {sorted(ESTIMATORS)}")
    problems.extend(_algorithm_errors(c))
    if c.batch_size > 0 and c.minibatch_size > 0 and c.batch_size % c.minibatch_size:
        problems.append(f"minibatch_size={c.minibatch_size} does not divide batch_size={c.batch_size}")
    if c.minibatch_size > 0 and c.gradient_accumulation_steps > 0 and c.minibatch_size % c.gradient_accumulation_steps:
        problems.append(f"gradient_accumulation_steps={c.gradient_accumulation_steps} does not divide "
                        f"minibatch_size={c.minibatch_size}")
    if c.min_new_tokens > c.max_new_tokens > 0:
        problems.append(f"min_new_tokens={c.min_new_tokens} exceeds max_new_tokens={c.max_new_tokens}")
    if not c.ratio_threshold > 1:
        problems.append(f"ratio_threshold={c.ratio_threshold!r} must be > 1 (PPO ratios start at 1)")
    if c.resume not in (True, False, "auto"):
        problems.append(f"resume={c.resume!r} must be true, false or auto")
    if c.adaptive_kl and c.init_kl_coef == 0:
        problems.append("adaptive_kl needs init_kl_coef > 0: the controller scales beta multiplicatively, so 0 stays 0")
    if (c.whiten_advantages or c.whiten_rewards) and c.batch_size == 1:
        problems.append("batch_size=1 cannot be whitened (a one-token response leaves one value); use batch_size >= 2 "
                        "or set whiten_advantages=false and whiten_rewards=false")
    if c.eval_sampling not in ("greedy", "train"):
        problems.append(f"eval_sampling={c.eval_sampling!r} must be greedy or train")
    problems.extend(_loss_errors(c))
    from tether.rollout.engines import engine_errors  # the rules live beside the engines

    problems.extend(engine_errors(c))
    problems.extend(scheduler_and_device_errors(c))
    problems.extend(tracker_key_errors(c))
    from tether.rollout.sampling import generation_kwargs_errors  # the rules live beside the sampler

    problems.extend(generation_kwargs_errors(c.generation_kwargs))
    return problems


def _algorithm_errors(c) -> list[str]:
    problems = []
    if c.num_generations > 0 and c.batch_size % c.num_generations:
        problems.append(f"num_generations={c.num_generations} does not divide batch_size={c.batch_size}")
    algorithm = ALGORITHMS[c.algorithm]
    if algorithm.min_generations > 1 and c.num_generations < algorithm.min_generations:
        problems.append(f"{c.algorithm} compares completions of the same prompt: num_generations must be >= "
                        f"{algorithm.min_generations}, got {c.num_generations}")
    if c.critic != "shared" and not algorithm.uses_critic:
        users = " and ".join(sorted(a.name for a in ALGORITHMS.values() if a.uses_critic))
        problems.append(f"critic={c.critic!r}: only {users} uses a critic; {c.algorithm} is critic-free")
    if c.kl_in_loss and c.kl_estimator in ("kl", "k1"):
        problems.append(f"kl_in_loss with kl_estimator={c.kl_estimator}: the expected gradient of k1 is zero (the "
                        f"score function has mean zero), so it would not hold the policy; use k3 (the default "
                        f"there) or mse")
    defaults = {f.name: f.default for f in fields(c)}
    for key, why in algorithm.inert.items():
        if getattr(c, key) != defaults[key]:
            problems.append(f"{key}={getattr(c, key)!r} does nothing for {c.algorithm} ({why}); leave it unset")
    return problems


def _loss_errors(c) -> list[str]:
    """The loss menu's keys (docs/algorithms.md, "The loss menu"): values, and the combinations that cannot work."""
    problems = []
    choices = {"scale_rewards": ("group", "batch", "none"), "overlong": ("none", "mask", "soft"),
               "importance_ratio": ("token", "sequence"), "policy_loss": ("ppo", "cispo"),
               "loss_aggregation": ("token_mean", "sequence_mean", "sequence_sum_norm")}
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            problems.append(f"{key}={getattr(c, key)!r} is not one of {list(allowed)}")
    for key in ("cliprange_low", "cliprange_high"):
        value = getattr(c, key)
        if not (isinstance(value, (int, float)) and value > 0):
            problems.append(f"{key}={value!r} must be > 0")
    if isinstance(c.cliprange_low, (int, float)) and c.cliprange_low >= 1 and c.policy_loss == "ppo":
        problems.append(f"cliprange_low={c.cliprange_low!r} must be < 1 (the ratio's lower bound 1 - cliprange_low "
                        f"must stay positive)")
    if c.dual_clip is not None:
        if not c.dual_clip > 1:
            problems.append(f"dual_clip={c.dual_clip!r} must be > 1 (it bounds the loss at -A * dual_clip for a "
                            f"negative advantage; 3 in veRL)")
        if c.importance_ratio == "sequence":
            problems.append("dual_clip with importance_ratio=sequence: GSPO clips the sequence ratio in a range of "
                            "about 1e-3, where a bound at a ratio > 1 never acts; leave dual_clip unset")
        if c.policy_loss == "cispo":
            problems.append("dual_clip with policy_loss=cispo: CISPO has no clipped surrogate to bound; leave "
                            "dual_clip unset")
    if c.policy_loss == "cispo" and c.importance_ratio == "sequence":
        problems.append("policy_loss=cispo with importance_ratio=sequence: CISPO weights each token's log-prob by "
                        "its own capped ratio; use importance_ratio=token (or policy_loss=ppo for GSPO)")
    if c.loss_norm_constant is not None:
        if c.loss_aggregation != "sequence_sum_norm":
            problems.append(f"loss_norm_constant={c.loss_norm_constant!r} is only used by "
                            f"loss_aggregation=sequence_sum_norm (got {c.loss_aggregation})")
        elif not c.loss_norm_constant > 0:
            problems.append(f"loss_norm_constant={c.loss_norm_constant!r} must be > 0")
    if not c.entropy_coef >= 0:
        problems.append(f"entropy_coef={c.entropy_coef!r} must be >= 0")
    if c.overlong == "soft":
        if not 0 < c.overlong_buffer < c.max_new_tokens:
            problems.append(f"overlong=soft needs 0 < overlong_buffer < max_new_tokens, got overlong_buffer="
                            f"{c.overlong_buffer} with max_new_tokens={c.max_new_tokens}")
        if not c.overlong_penalty > 0:
            problems.append(f"overlong_penalty={c.overlong_penalty!r} must be > 0")
    elif c.overlong_buffer != 0 or c.overlong_penalty != 1.0:
        problems.append(f"overlong_buffer / overlong_penalty only act with overlong=soft (got overlong={c.overlong})")
    if c.dynamic_sampling and c.num_generations is not None and c.num_generations < 2:
        problems.append(f"dynamic_sampling with num_generations={c.num_generations}: it drops groups whose "
                        f"completions all scored the same, which needs num_generations >= 2")
    if c.dynamic_sampling_max_rounds < 0:
        problems.append(f"dynamic_sampling_max_rounds={c.dynamic_sampling_max_rounds!r} must be >= 0")
    return problems


def tracker_key_errors(c) -> list[str]:
    """Checks of the tracker keys shared by PPOConfig and RewardConfig (report_to: tether.report.trackers)."""
    from tether.report.trackers import tracker_errors

    problems = tracker_errors(c.report_to)
    if not (isinstance(c.tracker_tags, (list, tuple)) and all(isinstance(t, str) and t for t in c.tracker_tags)):
        problems.append(f"tracker_tags={c.tracker_tags!r} must be a list of non-empty strings")
    if not (isinstance(c.tracker_project, str) and c.tracker_project):
        problems.append(f"tracker_project={c.tracker_project!r} must be a non-empty string")
    if c.run_name is not None and not (isinstance(c.run_name, str) and c.run_name):
        problems.append(f"run_name={c.run_name!r} must be a non-empty string (or unset)")
    return problems


def scheduler_and_device_errors(c) -> list[str]:
    """Checks shared by every config with `lr_scheduler_type` and `device` (PPOConfig, RewardConfig)."""
    problems = []
    if c.lr_scheduler_type not in _SCHEDULERS:
        problems.append(f"lr_scheduler_type={c.lr_scheduler_type!r} is not one of {sorted(_SCHEDULERS)}")
    if c.device != "auto":
        try:
            torch.device(c.device)
        except RuntimeError:
            problems.append(f"device={c.device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)")
    return problems
