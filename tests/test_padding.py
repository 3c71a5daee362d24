"""Less padding: micro-batches of rows of like length, each cut to its own longest prompt and response, in scoring
and in every update. The grouping and the cut change the work, never the result: the same scores, the same
update (to float round-off) as one padding for the whole batch and any grouping of the rows."""

import pytest
import torch
from conftest import make_model, make_tokenizer

from tether import PPOConfig
from tether.ops.masks import padding_bounds
from tether.rollout.batch import Rollouts
from tether.trainers import trainer_class
from tether.trainers.batching import left_pad, length_order, right_pad


def test_padding_bounds_and_trimmed_by_hand():
    q_ids, q_mask = left_pad([torch.tensor([5, 6]), torch.tensor([7])], 2)  # widths 2, 1 -> one column padding
    r_ids, r_mask = right_pad([torch.tensor([8, 9, 10]), torch.tensor([11])], 2)
    wide_q = torch.cat([torch.full((2, 3), 2), q_ids], 1)  # three more columns of padding in every row
    wide_qm = torch.cat([torch.zeros(2, 3, dtype=torch.long), q_mask], 1)
    wide_r = torch.cat([r_ids, torch.full((2, 2), 2)], 1)
    wide_rm = torch.cat([r_mask, torch.zeros(2, 2, dtype=torch.long)], 1)
    assert padding_bounds(wide_qm, wide_rm) == (3, 3)
    assert padding_bounds(torch.zeros(1, 4), torch.zeros(1, 5)) == (0, 1)  # nothing real: keep one column
    z = torch.zeros(2, 5)
    b = Rollouts(wide_q, wide_qm, wide_r, wide_rm, z, z, z.bool(), None, z, z, z, scores=torch.tensor([1.0, 2.0]),
                 advantages=torch.arange(10.0).view(2, 5))
    t = b.trimmed()
    assert t.query_ids.tolist() == [[5, 6], [2, 7]] and t.query_mask.tolist() == [[1, 1], [0, 1]]
    assert t.response_ids.tolist() == [[8, 9, 10], [11, 2, 2]] and t.mask.shape == (2, 3)
    assert t.advantages.tolist() == [[0, 1, 2], [5, 6, 7]] and t.scores.tolist() == [1.0, 2.0]


def test_length_order_is_stable_and_by_total_length():
    q = torch.tensor([[1, 1], [0, 1], [1, 1], [0, 0]])
    r = torch.tensor([[1, 0], [1, 1], [1, 1], [1, 0]])
    assert length_order(q, r).tolist() == [3, 0, 1, 2]  # lengths 3, 3, 4, 1: ties keep their order


PROMPTS = ["the movie was", "i really", "a story about the actor and the movie", "the", "the movie was a",
           "i", "a story", "the actor and the story was"]


def _run(tmp_path, name, monkeypatch, whole: bool, case: dict):
    """One step on fixed rollouts of mixed lengths; `whole`: the old way (one padding for the batch, rows in order
    by a random grouping, no cut), else the default."""
    import tether.trainers.optimise as optimise
    import tether.trainers.scoring as scoring

    with monkeypatch.context() as patch:
        if whole:
            shuffled = lambda q, r: torch.randperm(len(q), generator=torch.Generator().manual_seed(len(q)))  # noqa
            patch.setattr(optimise, "length_order", shuffled)
            patch.setattr(scoring, "length_order", shuffled)
            patch.setattr(scoring, "padding_bounds", lambda q, r: (0, r.shape[1]))
            patch.setattr(Rollouts, "trimmed", lambda self: self)
        tok = make_tokenizer()
        cfg = PPOConfig(**{"batch_size": 8, "minibatch_size": 8, "gradient_accumulation_steps": 4, "ppo_epochs": 2,
                           "max_new_tokens": 8, "seed": 0, "device": "cpu", "learning_rate": 1e-2,
                           "output_dir": str(tmp_path / name), **case})
        trainer = trainer_class(cfg.algorithm)(cfg, model=make_model(len(tok)), tokenizer=tok)
        g = torch.Generator().manual_seed(0)
        group = cfg.num_generations  # rows k*G .. k*G + G - 1: one prompt's completions
        queries = [torch.tensor(tok(PROMPTS[i - i % group])["input_ids"]) for i in range(8)]
        responses = [torch.randint(3, len(tok), (1 + (5 * i) % 8,), generator=g) for i in range(8)]
        responses[2][-1] = responses[5][-1] = tok.eos_token_id
        batch = trainer.score(queries, responses)
        stats = trainer.step(queries, responses, [float(i % 3) for i in range(8)])
    return batch, stats, [p.detach().clone() for p in trainer.trainable.parameters()]


@pytest.mark.parametrize("case", [{"algorithm": "ppo"},
                                  {"algorithm": "grpo", "num_generations": 2, "kl_in_loss": True,
                                   "loss_aggregation": "sequence_mean", "temperature": 0.7,
                                   "repetition_penalty": 1.2}],
                         ids=["ppo", "grpo_tempered_penalised"])
def test_grouping_and_cutting_change_the_work_not_the_update(tmp_path, monkeypatch, case):
    batch_w, stats_w, params_w = _run(tmp_path, "whole", monkeypatch, True, case)
    batch_c, stats_c, params_c = _run(tmp_path, "cut", monkeypatch, False, case)
    for field in ("logprobs", "ref_logprobs", "kl", "kl_exact", "entropy", "values"):
        a, b = getattr(batch_w, field), getattr(batch_c, field)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=field)
    for key in ("objective/kl", "ppo/loss/policy", "ppo/policy/ratio_mean", "ppo/grad_norm"):
        assert stats_c[key] == pytest.approx(stats_w[key], abs=1e-6, rel=1e-5), key
    for a, b in zip(params_w, params_c):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    # the work did shrink: padding share of the updates' forward passes, against one padding for the batch
    assert stats_w["throughput/padding_share"] == pytest.approx(stats_w["throughput/padding_share_batch_padded"])
    assert stats_c["throughput/padding_share"] < stats_c["throughput/padding_share_batch_padded"] - 0.1
