"""vLLM as the rollout engine, colocated: the engine lives in the trainer's process and is fed the trained weights
in memory, never through a checkpoint on disk.

- Built once at set-up from the policy's config alone (`load_format="dummy"`: no weights read), without its
  tokenizer (prompts go in as token ids) and without the model's generation_config (so a default top_k cannot
  slip in, as tether's own loop guards against too). Before its first generation, and before every generation
  that follows an update or a resume, the policy's weights are pushed in place through the model runner's
  `reload_weights(weights_iterator=...)`; LoRA adapters are merged into the pushed copy (the trained module keeps
  them apart). Then the prefix cache is emptied: it holds keys and values computed with the old weights.
- Sampling settings map one to one onto SamplingParams (`sampling_params`); settings vLLM cannot sample with are
  refused before any model loads (rollout/engines.py). Each completion gets its own seed, drawn from the
  trainer's sampling generator, so runs repeat and a resumed run continues the same stream.
- Behaviour log-probs: `logprobs_mode="processed_logprobs"` makes vLLM report the log-softmax of the scores it
  sampled from (after penalties, min_tokens' EOS ban, temperature, top-k and top-p), the counterpart of
  `Sampler.step_scores`; `logprobs=0` asks for the sampled token's alone.
- `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps vLLM's engine core in this process: the weight push hands it tensors,
  not serialised copies, and no second process is spawned.
"""

import copy
import os
import tempfile
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from tether.rollout.batch import Sampled

PIP = "pip install 'tether[vllm]'  (vLLM's CPU build; on a CUDA machine: pip install vllm)"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sampling_params(c, eos_token_ids: list[int], seed: int):
    """vLLM's SamplingParams for one completion under PPOConfig `c`'s sampling keys, one to one: temperature,
    top_k (0 = off in both), top_p, min_new_tokens -> min_tokens (vLLM bans its stop tokens, tether's EOS ids, until
    then), repetition_penalty (CTRL's, over prompt and completion, as Sampler), max_new_tokens -> max_tokens, and
    the completion's seed. EOS ids are stop tokens and stay in the returned ids, as in tether's responses."""
    from vllm import SamplingParams

    return SamplingParams(n=1, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, min_tokens=c.min_new_tokens,
                          repetition_penalty=c.repetition_penalty, max_tokens=c.max_new_tokens, seed=seed,
                          stop_token_ids=list(eos_token_ids), logprobs=0, detokenize=False, skip_special_tokens=False)


def merged_weights(lm: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The causal LM's weights by checkpoint name; with LoRA (PEFT layers inside `lm`), each adapted weight with
    its active adapters' update merged in, and the adapters' own tensors left out. Nothing in `lm` changes."""
    layers = {name: m for name, m in lm.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    for name, tensor in lm.state_dict().items():
        if ".lora_" in name:
            continue
        owner, base, param = name.partition(".base_layer.")
        if not base:
            yield name, tensor
            continue
        layer = layers[owner]
        if param == "weight":
            with torch.no_grad():
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        yield f"{owner}.{param}", tensor


class VLLMEngine:
    """engine(queries) -> Sampled, with the weights of `lm` pushed in first whenever `weights_changed()` was
    called since the last push (and before the first generation)."""

    def __init__(self, c, lm: torch.nn.Module, eos_token_ids: list[int], generator: torch.Generator,
                 max_model_len: int, autocast_dtype: torch.dtype | None, rank: int = 0,
                 weights: Callable[[], Iterator[tuple[str, Tensor]]] | None = None, llm=None) -> None:
        """llm: an engine already built for the same model shape, to reuse (tests share one); its weights are
        replaced before the first generation all the same."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the engine is built
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError(f"rollout_engine=vllm needs vLLM: {PIP}") from err
        self.config, self.eos_token_ids, self.generator = c, list(eos_token_ids), generator
        self.weights = weights or (lambda: merged_weights(lm))
        self.pushes = 0  # how many times the weights were pushed (tests and logs read it)
        self._stale = True  # the engine starts with dummy weights
        if llm is not None:
            self.llm = llm
            return
        dtype = c.vllm_dtype if c.vllm_dtype != "auto" else (
            "float32" if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."))
        self._folder = tempfile.TemporaryDirectory(prefix="tether-vllm-")  # the config only: no weights
        base = getattr(lm, "get_base_model", lambda: lm)()
        config = copy.deepcopy(base.config)
        config.architectures = config.architectures or [type(base).__name__]  # how vLLM picks its model class
        config.save_pretrained(self._folder.name)
        self.llm = LLM(model=self._folder.name, load_format="dummy", skip_tokenizer_init=True,
                       generation_config="vllm", logprobs_mode="processed_logprobs", dtype=dtype,
                       max_model_len=max_model_len, enforce_eager=c.vllm_enforce_eager,
                       gpu_memory_utilization=c.vllm_gpu_memory_utilization, seed=c.seed + rank)

    def weights_changed(self) -> None:
        """The trained weights moved (an update, a resume): push them before the next generation."""
        self._stale = True

    def push(self) -> None:
        """The current weights into the engine, in place, then its prefix cache emptied."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self.weights()})
        self.llm.reset_prefix_cache()
        self.pushes += 1
        self._stale = False

    def __call__(self, queries: list[Tensor]) -> Sampled:
        from vllm.inputs import TokensPrompt

        if self._stale:
            self.push()
        g = self.generator
        seeds = torch.randint(2**31 - 1, (len(queries),), generator=g, device=g.device).tolist()
        prompts = [TokensPrompt(prompt_token_ids=q.tolist()) for q in queries]
        params = [sampling_params(self.config, self.eos_token_ids, s) for s in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        responses, logprobs = [], []
        for out in outputs:
            done = out.outputs[0]
            ids = list(done.token_ids)
            responses.append(torch.tensor(ids, dtype=torch.long))
            logprobs.append(torch.tensor([step[t].logprob for step, t in zip(done.logprobs, ids)],
                                         dtype=torch.float32))
        return Sampled(responses, logprobs)

    def prompt_logprobs(self, ids: list[int], start: int) -> Tensor:
        """log p(ids[t] | ids[:t]) for t >= start under the engine's current weights, raw (temperature 1, no
        truncation): the check that the engine holds the trainer's weights (the tests use it)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self._stale:
            self.push()
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids))],
                                SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=1.0),
                                use_tqdm=False)[0]
        return torch.tensor([out.prompt_logprobs[t][ids[t]].logprob for t in range(start, len(ids))])
