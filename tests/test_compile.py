"""compile=true: the trained forward pass through torch.compile (inductor), the same training as eager."""

import os
import shutil

import pytest
import torch
from conftest import make_model, make_tokenizer
from test_ppo_learns import PROMPTS
from transformers import AutoModelForCausalLM

from tether import PPOConfig
from tether.trainers import PPOTrainer
from tether.trainers.setup import check_compile


def _has_cpp_compiler() -> bool:
    """Decided apart from check_compile (the function under test): a compiler on PATH, as inductor looks for one."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else []
    return any(shutil.which(name) for name in names + ["g++", "c++", "clang++"])


def _trainer(tmp_path, compile_: bool, name: str = "", **kw) -> PPOTrainer:
    tok = make_tokenizer()
    cfg = PPOConfig(batch_size=4, minibatch_size=2, ppo_epochs=2, max_new_tokens=6, learning_rate=1e-2,
                    compile=compile_, device="cpu", output_dir=str(tmp_path / (name or str(compile_))), **kw)
    return PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)


@pytest.mark.skipif(not _has_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_forward_trains_like_the_eager_one(tmp_path):
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    scores = [0.0, 1.0, 2.0, 0.5]
    eager = _trainer(tmp_path, False)
    gen_e = eager.generate(PROMPTS[:4])
    stats_e = eager.step(gen_e.queries, gen_e.responses, scores)

    compiled = _trainer(tmp_path, True)
    assert isinstance(compiled.learner.trained_module, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(eager.learner.trained_module, torch._dynamo.eval_frame.OptimizedModule)
    gen_c = compiled.generate(PROMPTS[:4])
    before = graphs["unique_graphs"]
    compiled.score(gen_c.queries, gen_c.responses)  # the scoring pass (no grad) compiles a graph
    after_scoring = graphs["unique_graphs"]
    assert after_scoring > before
    stats_c = compiled.step(gen_c.queries, gen_c.responses, scores)
    assert graphs["unique_graphs"] > after_scoring  # the scoring graph is reused; the updates (grad) compile theirs
    # generation is eager on both sides, so the same samples; scoring and updates agree up to fused round-off
    assert [r.tolist() for r in gen_e.responses] == [r.tolist() for r in gen_c.responses]
    for key in ("objective/kl", "objective/entropy", "ppo/loss/policy", "ppo/loss/value", "ppo/policy/ratio_mean"):
        assert stats_c[key] == pytest.approx(stats_e[key], rel=1e-4, abs=1e-5), key
    for (name, a), b in zip(eager.trainable.named_parameters(), compiled.trainable.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)
    untouched = make_model(len(make_tokenizer())).parameters()
    assert max((a - b).abs().max().item() for a, b in zip(eager.trainable.parameters(), untouched)) > 1e-3
    # a step with other prompt and response lengths recompiles (then with dynamic shapes) and still trains
    gen = compiled.generate(["a much longer prompt than the ones before it", "hi", "the movie", "i really"])
    stats = compiled.step(gen.queries, gen.responses, [1.0, 0.0, 0.5, 2.0])
    assert all(v == v for v in stats.values())

    # the saved policy is the trained one, loadable by transformers
    compiled.save(tmp_path / "policy")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    q = gen.queries[0][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(q).logits, compiled.policy.model(q).logits, atol=1e-5, rtol=1e-5)
    # a compiled run's checkpoint resumes without compile (e.g. where no C++ compiler is): compile may change
    compiled.save_checkpoint()
    resumed = _trainer(tmp_path, False, name="True", resume=True)
    resumed.resume()
    assert resumed.step_count == compiled.step_count == 2
    for a, b in zip(compiled.trainable.parameters(), resumed.trainable.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_compile_without_a_cpp_compiler_is_refused_before_loading_anything(tmp_path, monkeypatch):
    from torch._inductor import cpp_builder

    def missing():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    # the model folder does not exist: reaching it would be a different error
    with pytest.raises(RuntimeError, match="needs a C.. compiler.*compile=false"):
        PPOTrainer(PPOConfig(model=str(tmp_path / "absent"), compile=True, device="cpu",
                             output_dir=str(tmp_path / "run")))


@pytest.mark.parametrize("sharding", ["deepspeed-zero3", "fsdp2"])
def test_compile_with_sharded_parameters_is_refused(sharding):
    with pytest.raises(ValueError, match=f"sharded parameters \\({sharding}\\).*DDP or ZeRO-2"):
        check_compile(torch.device("cpu"), sharding)
