"""compile=true: the trained forward pass through torch.compile (inductor), the same training as eager."""

import pytest
import torch
from conftest import make_model, make_tokenizer
from test_ppo_learns import PROMPTS

from tether import PPOConfig
from tether.trainers import PPOTrainer
from tether.trainers.setup import check_compile


def _one_step(tmp_path, compile_: bool, prompts):
    tok = make_tokenizer()
    cfg = PPOConfig(batch_size=4, minibatch_size=2, ppo_epochs=2, max_new_tokens=6, learning_rate=1e-2,
                    compile=compile_, device="cpu", output_dir=str(tmp_path / str(compile_)))
    trainer = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok)
    gen = trainer.generate(prompts)
    stats = trainer.step(gen.queries, gen.responses, [0.0, 1.0, 2.0, 0.5])
    return trainer, gen, stats


def test_compiled_forward_trains_like_the_eager_one(tmp_path):
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager, gen_e, stats_e = _one_step(tmp_path, False, PROMPTS[:4])
    compiled, gen_c, stats_c = _one_step(tmp_path, True, PROMPTS[:4])
    assert isinstance(compiled.trainable_forward, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(eager.trainable_forward, torch._dynamo.eval_frame.OptimizedModule)
    # the scoring pass (no grad) and the updates (grad) each ran a compiled graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before >= 2
    # generation is eager on both sides, so the same samples; scoring and updates agree up to fused round-off
    assert [r.tolist() for r in gen_e.responses] == [r.tolist() for r in gen_c.responses]
    for key in ("objective/kl", "objective/entropy", "ppo/loss/policy", "ppo/loss/value", "ppo/policy/ratio_mean"):
        assert stats_c[key] == pytest.approx(stats_e[key], rel=1e-4, abs=1e-5), key
    for (name, a), b in zip(eager.trainable.named_parameters(), compiled.trainable.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)
    moved = max((a - b).abs().max().item() for a, b in zip(eager.trainable.parameters(),
                                                             make_model(len(make_tokenizer())).parameters()))
    assert moved > 1e-3  # the comparison above is between trained weights, not two untouched copies
    # a step with other prompt and response lengths recompiles (then with dynamic shapes) and still trains
    gen = compiled.generate(["a much longer prompt than the ones before it", "hi", "the movie", "i really"])
    stats = compiled.step(gen.queries, gen.responses, [1.0, 0.0, 0.5, 2.0])
    assert all(v == v for v in stats.values())
    # the checkpoint and the saved policy hold the module's own names, not the compiled wrapper's
    assert not any(k.startswith("_orig_mod") for k in compiled.trainable.state_dict())


def test_compile_without_a_cpp_compiler_is_refused_before_loading_anything(tmp_path, monkeypatch):
    from torch._inductor import cpp_builder

    def missing():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    # the model folder does not exist: reaching it would be a different error
    with pytest.raises(RuntimeError, match="needs a C.. compiler.*compile=false"):
        PPOTrainer(PPOConfig(model=str(tmp_path / "absent"), compile=True, device="cpu",
                             output_dir=str(tmp_path / "run")))


def test_compile_with_several_processes_is_refused():
    with pytest.raises(ValueError, match="one process.*has 2"):
        check_compile(torch.device("cpu"), 2)
