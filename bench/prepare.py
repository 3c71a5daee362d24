"""Write the inputs both sides load (run with tether's .venv): bench/results/<workload>/inputs.json.

(a) a random GPT-2 (4 layers, width 256, vocabulary 4096) built once from a fixed seed, saved with a
    WordLevel tokenizer (token "w<i>" = id i, id 0 = <|endoftext|>), and 64 prompts of exactly 16 ids.
(b) SmolLM2-135M-Instruct from tether's cache, and the first 16 movie-review openings tokenised by it.
(v) for the response-length curves (vocab_memory.py): a random GPT-2 body of 2 layers, width 64, with Qwen's
    151,936-token vocabulary (tied embeddings, 512 positions), the same WordLevel tokenizer scheme as (a), and
    8 prompts of exactly 16 ids; and a copy whose EOS is an id outside the vocabulary (the "-eosout" workloads).
    TRL's side gets a copy of the folder readable by transformers 4.46: the weights are linked, the
    config gains `rope_theta` (5.x moved it into `rope_parameters`, which 4.46 ignores, silently falling
    back to 10000), and the tokenizer config names PreTrainedTokenizerFast instead of 5.x's backend class.
The logits checksum of the first prompt is stored; each side recomputes it and compare.py checks them.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from workloads import RESULTS, folder, logits_checksum, progress

EOS = "<|endoftext|>"


def tokenizer_config(special: dict) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192, **special}


def random_gpt2(out, vocab_size: int, n_positions: int, width: int, layers: int, prompts: int) -> dict:
    """A random GPT-2 (seed 0, no dropout) and a WordLevel tokenizer ("w<i>" = id i, id 0 = EOS) in `out`, and
    `prompts` prompts of 16 random ids (seed 1)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=width, n_layer=layers, n_head=4,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)  # deterministic: no dropout
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(out)
    vocab = {EOS: 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(
        {"eos_token": EOS, "pad_token": EOS, "bos_token": EOS, "unk_token": EOS})))
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(1, vocab_size, (prompts, 16), generator=g).tolist()
    return {"model": {"tether": str(out), "trl": str(out)}, "prompt_ids": prompt_ids,
            "prompts": [" ".join(f"w{i}" for i in ids) for ids in prompt_ids],
            "logits_checksum": logits_checksum(model, prompt_ids)}


def tiny_gpt2() -> dict:
    return random_gpt2(folder("a") / "tiny-gpt2", vocab_size=4096, n_positions=64, width=256, layers=4, prompts=64)


def vocab152k() -> dict:
    meta = random_gpt2(folder("v") / "gpt2-2x64-vocab151936", vocab_size=151936, n_positions=512, width=64,
                       layers=2, prompts=8)
    meta["model"]["eos_outside"] = str(eos_outside_vocab(Path(meta["model"]["tether"]), 151936))
    return meta


def eos_outside_vocab(src: Path, vocab_size: int) -> Path:
    """The same weights (linked) with EOS = a token id the model has no logit for (`vocab_size`): nothing can sample
    it, so every completion runs to max_new_tokens with no sampling rule involved (no min_new_tokens to replay)."""
    out = src.parent / (src.name + "-eos-outside")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.symlink(src / "model.safetensors", out / "model.safetensors")
    for name in ("config.json", "generation_config.json"):
        config = json.loads((src / name).read_text())
        config["eos_token_id"] = vocab_size
        (out / name).write_text(json.dumps(config, indent=2))
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["model"]["vocab"]["<|eos-outside|>"] = vocab_size
    (out / "tokenizer.json").write_text(json.dumps(tok))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(
        {"eos_token": "<|eos-outside|>", "pad_token": EOS, "bos_token": EOS, "unk_token": EOS})))
    return out


def smollm2() -> dict:
    from transformers import AutoTokenizer

    from tether.demo import movie_review_openings
    from tether.models.smollm2 import smollm2_path

    src = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(src)
    prompts = movie_review_openings()[:16]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    trl = folder("b") / "smollm2-for-transformers-4.46"
    shutil.rmtree(trl, ignore_errors=True)
    trl.mkdir(parents=True)
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        os.symlink(src / name, trl / name)
    config = json.loads((src / "config.json").read_text())
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))
    config["torch_dtype"] = config.get("dtype", "float32")
    (trl / "config.json").write_text(json.dumps(config, indent=2))
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (trl / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(special)))
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    return {"model": {"tether": str(src), "trl": str(trl)}, "prompts": prompts, "prompt_ids": prompt_ids,
            "logits_checksum": logits_checksum(model, prompt_ids)}


def main(workloads=("a", "b")) -> None:
    for name in workloads:
        progress(f"prepare workload ({name})")
        meta = {"a": tiny_gpt2, "b": smollm2, "v": vocab152k}[name]()
        folder(name).mkdir(parents=True, exist_ok=True)
        (folder(name) / "inputs.json").write_text(json.dumps(meta))
    RESULTS.mkdir(exist_ok=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:] or ("a", "b"))
