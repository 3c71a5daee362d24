"""Bad paths say what was typed, and a missing optional package is named before any model loads."""

import json
import sys

import pytest
from conftest import make_model, make_tokenizer

from tether import PPOConfig
from tether.cli import main
from tether.extras import check_extras, needed_extras
from tether.models.paths import check_model_folder, is_local


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "the movie was"}) + "\n")
    return path


@pytest.fixture
def tiny(tmp_path):
    tok = make_tokenizer()
    make_model(len(tok)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _ppo(tmp_path, *flags):
    return main(["ppo", "--output_dir", str(tmp_path / "run"), *flags])


def test_a_model_path_that_does_not_exist_says_so(tmp_path, prompts, capsys):
    assert _ppo(tmp_path, "--model", "/nope", "--prompts", str(prompts), "--reward", "rewards_for_tests:count_good") == 2
    err = capsys.readouterr().err
    assert "model '/nope': no such folder" in err, err
    assert "Repo id" not in err


@pytest.mark.parametrize("remove, message", [
    (["model.safetensors"], "has no weights (model.safetensors / "),
    (["config.json"], "has no config.json; it holds:"),
    (["tokenizer.json", "tokenizer_config.json"], "has no tokenizer files (tokenizer.json / "),
])
def test_a_model_folder_without_a_file_names_it(tmp_path, tiny, prompts, capsys, remove, message):
    for name in remove:
        (tiny / name).unlink()
    assert _ppo(tmp_path, "--model", str(tiny), "--prompts", str(prompts), "--reward",
                "rewards_for_tests:count_good") == 2
    err = capsys.readouterr().err
    assert f"model folder {str(tiny)!r} {message}" in err, err


def test_reward_and_prompt_paths_say_what_was_typed(tmp_path, tiny, prompts, capsys):
    assert _ppo(tmp_path, "--model", str(tiny), "--prompts", str(prompts), "--reward", str(tmp_path / "rm")) == 2
    assert f"reward {str(tmp_path / 'rm')!r}: no such folder" in capsys.readouterr().err
    (tmp_path / "rm").mkdir()
    assert _ppo(tmp_path, "--model", str(tiny), "--prompts", str(prompts), "--reward", str(tmp_path / "rm")) == 2
    assert f"reward folder {str(tmp_path / 'rm')!r} has no config.json" in capsys.readouterr().err
    assert _ppo(tmp_path, "--model", str(tiny), "--prompts", "/nope", "--reward", "rewards_for_tests:count_good") == 2
    assert "prompts file '/nope': expected one of" in (err := capsys.readouterr().err) and "no such file" in err


def test_reward_training_backbone_path(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "good", "rejected": "bad"}) + "\n")
    assert main(["reward", "--model", "/nope", "--data", str(data), "--output_dir", str(tmp_path / "rm"),
                 "--eval_fraction", "0"]) == 2
    assert "model '/nope': no such folder" in capsys.readouterr().err


def test_hub_names_are_not_paths():
    assert not is_local("HuggingFaceTB/SmolLM2-135M") and not is_local("gpt2")
    assert is_local("/nope") and is_local("./here") and is_local("runs/demo/policy")
    check_model_folder("org/not-a-folder")  # left to the hub


# ---- optional packages ------------------------------------------------------------------------------------

def _missing(monkeypatch, *modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # importlib.util.find_spec then finds nothing


def test_the_demo_without_vader_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import tether.models.smollm2 as smollm2

    def no_loading():
        raise AssertionError("the model was reached")

    monkeypatch.setattr(smollm2, "smollm2_path", no_loading)
    _missing(monkeypatch, "vaderSentiment")
    assert main(["demo", "--output_dir", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "vaderSentiment (needed by the demo's VADER reward): pip install vaderSentiment" in err, err


def test_every_missing_extra_is_named_with_its_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "empty-cache"))  # SmolLM2 not converted yet: gguf needed
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    _missing(monkeypatch, "peft", "gguf", "deepspeed")
    config = PPOConfig(lora_r=4, model="", output_dir=str(tmp_path / "run"))
    with pytest.raises(ImportError) as err:
        check_extras(config, demo=True)
    for text in ("peft (needed by lora_r=4): pip install 'tether[peft]'", "deepspeed (needed by the launch's",
                 "gguf (needed by reading SmolLM2's GGUF file (once)): pip install gguf"):
        assert text in str(err.value)
    assert "vaderSentiment" not in str(err.value)  # installed here


def test_a_trainer_checks_extras_before_loading_anything(tmp_path, monkeypatch):
    from tether import PPOTrainer

    _missing(monkeypatch, "peft")
    # the model folder does not exist: reaching it would be a different error
    with pytest.raises(ImportError, match=r"peft \(needed by lora_r=8\): pip install 'tether\[peft\]'"):
        PPOTrainer(PPOConfig(model=str(tmp_path / "absent"), lora_r=8, device="cpu", output_dir=str(tmp_path / "r")))


def test_a_plain_config_needs_no_extra(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert needed_extras(PPOConfig()) == []
