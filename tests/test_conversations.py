"""Conversations (chat-template prompts) and rewards that see the prompt rows' columns."""

import json

import pytest
import torch
from conftest import make_model, make_tokenizer

from tether import PPOConfig
from tether.data import load_prompt_rows
from tether.trainers import GRPOTrainer, PPOTrainer

# A template over the tiny tokenizer's own words, so each rendered token is a real id (not <unk>).
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}so {% endif %}{{ m['content'] }} but "
            "{% endfor %}{% if add_generation_prompt %}and it{% endif %}")
CHAT = [{"role": "system", "content": "very"}, {"role": "user", "content": "the movie was"}]


def chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def template_ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_the_ids_sampled_from_are_the_chat_templates_and_strings_mix_with_conversations(tmp_path):
    tok = chat_tokenizer()
    prompts = ["i really", CHAT, [{"role": "user", "content": "a story"}], "we"]
    cfg = PPOConfig(steps=1, batch_size=4, minibatch_size=4, ppo_epochs=1, max_new_tokens=3, output_dir=str(tmp_path),
                    report_to=["none"])
    trainer = PPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=prompts,
                         reward=lambda p, c: [0.0] * len(c))
    expected = [tok("i really")["input_ids"], template_ids(tok, CHAT), template_ids(tok, prompts[2]), tok("we")["input_ids"]]
    assert template_ids(tok, CHAT) == tok("so very but the movie was but and it")["input_ids"]  # the test's premise
    assert [t.tolist() for t in trainer.encoded_prompts] == expected
    sampled = []
    original = trainer.generate
    trainer.generate = lambda queries: sampled.extend(q.tolist() for q in queries) or original(queries)
    trainer.train()
    assert sorted(sampled) == sorted(expected)  # what was sampled from (and then scored): the template's ids
    shown = {json.loads(line)["prompt"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()}
    assert "system: very\nuser: the movie was" in shown and "i really" in shown
    report = (tmp_path / "report" / "report.html").read_text()
    assert "system: very\nuser: the movie was" in report


def test_a_messages_column_and_mixed_rows_in_one_jsonl_file(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"messages": "i really", "answer": 1}, {"messages": CHAT, "answer": "2", "task": "t"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_prompt_rows(str(path))
    assert got.prompts == ["i really", CHAT]
    assert got.columns == [{"answer": 1}, {"answer": "2", "task": "t"}]
    assert got.column_names == ["answer", "task"]


@pytest.mark.parametrize("prompt, error, message", [
    ([], ValueError, "row 1: the conversation has no messages"),
    ([{"role": "user"}], TypeError, r"row 1, message 0: expected \{'role': str, 'content': str\}"),
    ([{"role": "user", "content": 3}], TypeError, "row 1, message 0"),
    ([{"role": "user", "content": "  "}], ValueError, "row 1: every message of the conversation is empty"),
    (7, TypeError, "row 1: prompt must be a string, got int 7 \\(or a conversation"),
])
def test_bad_conversations_name_the_row_and_message(prompt, error, message):
    with pytest.raises(error, match=message):
        load_prompt_rows(["fine", prompt])


def test_a_column_named_like_a_reward_argument_is_refused():
    with pytest.raises(ValueError, match=r"column\(s\) \['ended'\] clash"):
        load_prompt_rows([{"prompt": "a", "ended": 1}])


def test_a_conversation_without_a_template_is_refused_before_the_model_loads(tmp_path):
    cfg = PPOConfig(batch_size=2, minibatch_size=2, output_dir=str(tmp_path))
    # the model is a folder that does not exist: the refusal must come before anything tries to load it
    with pytest.raises(ValueError, match=r"prompts, row 1 is a conversation .* no chat template .* `chat_template` "
                                         r"to a template file or to one shipped with tether \(chatml\)"):
        PPOTrainer(cfg, model=str(tmp_path / "no-model-here"), tokenizer=make_tokenizer(), prompts=["a", CHAT],
                   reward=lambda p, c: [0.0] * len(c))


def test_chat_template_key_takes_a_shipped_name_or_a_file(tmp_path):
    from tether.chat import read_chat_template

    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    for spec, expected_start in (("chatml", "<|im_start|>user\nthe movie was<|im_end|>"), (str(path), "the movie was but")):
        tok = make_tokenizer()
        cfg = PPOConfig(batch_size=2, minibatch_size=2, max_new_tokens=2, chat_template=spec, output_dir=str(tmp_path))
        trainer = PPOTrainer(cfg, model=make_model(len(tok), n_positions=128), tokenizer=tok,
                             prompts=[CHAT[1:], "we"], reward=lambda p, c: [0.0] * len(c))
        assert trainer.prompt_texts[0].startswith(expected_start)  # what the reward sees: the rendered text
        assert trainer.encoded_prompts[0].tolist() == template_ids(tok, CHAT[1:])
    with pytest.raises(FileNotFoundError, match="chat_template 'nope.jinja' is neither a template shipped"):
        read_chat_template("nope.jinja")


def answer_rows(n):
    """Prompts whose `answer` column can be recomputed from the prompt: a reward can check it got the right one."""
    words = ["the movie was", "i really", "a story", "we", "it was fun", "the plot", "the actor", "dull music"]
    return [{"prompt": words[i] if i % 2 else [{"role": "user", "content": words[i]}], "answer": f"answer-{i}",
             "task": "t"} for i in range(n)]


@pytest.mark.parametrize("dynamic", [False, True])
def test_each_completion_gets_its_own_rows_answer_with_several_generations(tmp_path, dynamic):
    tok = chat_tokenizer()
    rows = answer_rows(8)
    text_of = {}
    for i, r in enumerate(rows):
        text_of[r["prompt"] if isinstance(r["prompt"], str) else tok.apply_chat_template(
            r["prompt"], add_generation_prompt=True, tokenize=False)] = r["answer"]
    calls = []

    def reward(prompts, completions, answer, task, ended):
        calls.append(list(zip(prompts, answer)))
        assert [text_of[p] for p in prompts] == list(answer) and set(task) == {"t"}
        # differing scores within a group, so dynamic sampling keeps groups
        return [float(len(c)) for c in completions]

    cfg = PPOConfig(algorithm="grpo", steps=2, batch_size=8, num_generations=4, minibatch_size=8, ppo_epochs=1,
                    max_new_tokens=3, output_dir=str(tmp_path), dynamic_sampling=dynamic, report_to=["none"])
    trainer = GRPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=rows, reward=reward)
    assert trainer.reward_keywords == ("ended", "answer", "task")
    history = trainer.train()
    assert len(calls) >= 2 and all(len(call) == 8 for call in calls)
    for call in calls:  # groups of 4 share a prompt and its answer; two different prompts per step
        assert [a for _, a in call[:4]] == [call[0][1]] * 4 and call[4][1] != call[0][1]
    assert len(history) == 2


def test_the_ended_flag_is_right_for_finished_and_truncated_completions(tmp_path):
    from test_completion_info import eos_likely_model

    tok = chat_tokenizer()
    seen = []

    def reward(prompts, completions, ended, completion_tokens, answer):
        seen.append((list(ended), list(completion_tokens), list(answer)))
        return [0.0] * len(completions)

    cfg = PPOConfig(steps=1, batch_size=8, minibatch_size=8, ppo_epochs=1, max_new_tokens=4, output_dir=str(tmp_path),
                    report_to=["none"])
    trainer = PPOTrainer(cfg, model=eos_likely_model(tok), tokenizer=tok,
                         prompts=[{"prompt": "the movie was", "answer": 5}] * 8, reward=reward)
    generated = []
    original = trainer.generate
    trainer.generate = lambda queries: generated.append(original(queries)) or generated[-1]
    trainer.train()
    ended, tokens, answers = seen[0]
    assert ended == [r[-1].item() == tok.eos_token_id for r in generated[0].responses]
    assert True in ended and False in ended and answers == [5] * 8
    assert all(n == 4 for n, e in zip(tokens, ended) if not e)


@pytest.mark.parametrize("sampling", ["greedy", "train"])
def test_held_out_evaluation_is_logged_before_during_and_after_and_leaves_training_alone(tmp_path, sampling):
    tok = chat_tokenizer()
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in answer_rows(5)))

    def reward(prompts, completions, answer):
        return [float("good" in c) for c in completions]

    def run(out, **keys):
        cfg = PPOConfig(algorithm="grpo", steps=3, batch_size=4, num_generations=2, minibatch_size=4, ppo_epochs=1,
                        max_new_tokens=3, output_dir=str(tmp_path / out), report_to=["none"], **keys)
        return GRPOTrainer(cfg, model=make_model(len(tok)), tokenizer=tok, prompts=answer_rows(4), reward=reward).train()

    with_eval = run("a", eval_prompts=str(eval_path), eval_every=2, eval_sampling=sampling)
    plain = run("b")
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/reward_mean" in r] == [0, 2, 3]
    assert all(0 <= r["eval/reward_mean"] <= 1 for r in records if "eval/reward_mean" in r)
    # its own generator: the training run is the same with and without evaluation
    assert [h["env/reward_mean"] for h in with_eval] == [h["env/reward_mean"] for h in plain]
    assert [h["objective/kl"] for h in with_eval] == [h["objective/kl"] for h in plain]
    report = (tmp_path / "a" / "report" / "report.html").read_text()
    assert "Held-out reward (eval/reward_mean), by step" in report and "eval_reward_mean.png" in report


def test_the_conversational_examples_are_valid_configs_with_conversation_prompts():
    from pathlib import Path

    from tether.cli import build_parser, config_from_args

    root = Path(__file__).parents[1]
    for name in ("chat_sentiment", "chain_sum"):
        args = build_parser().parse_args(["demo", "--config", str(root / "examples" / f"{name}.yaml")])
        config = config_from_args(args.demo, "demo")
        rows = load_prompt_rows(str(root / config.prompts), config.prompt_column)
        assert len(rows.prompts) >= 100 and all(isinstance(p, list) and p[-1]["role"] == "user" for p in rows.prompts)


@pytest.mark.slow
def test_smollm2_keeps_its_chat_template_through_the_gguf_conversion():
    from transformers import AutoTokenizer

    from tether.models.smollm2 import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    assert tok.chat_template
    ids = template_ids(tok, [{"role": "user", "content": "2 + 3 ="}])
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"  # the reply ends where the template closes a turn


def test_on_two_processes_each_process_gets_its_shares_columns():
    """collect's sampling as rank 0 and rank 1 of 2 (the same data order on both, as the trainer seeds it): each
    process scores its half of the global batch, every completion with its own prompt row's answer, and the two
    halves together are the one-process batch."""
    from types import SimpleNamespace

    from tether.rollout.batch import Generation
    from tether.trainers.collect import _sample
    from tether.trainers.state import Progress

    rows = answer_rows(8)
    cfg = PPOConfig(algorithm="grpo", batch_size=8, num_generations=2, minibatch_size=4)

    def share(rank, num, local_batch):
        seen = []

        def reward(prompts, completions, answer):
            seen.extend(zip(prompts, answer))
            return [0.0] * len(completions)

        stub = SimpleNamespace(
            config=cfg, comm=SimpleNamespace(rank=rank, num=num), progress=Progress(torch.Generator().manual_seed(5)),
            prompts=[r["prompt"] for r in rows], prompt_texts=[str(i) for i in range(8)],
            prompt_columns=[{"answer": r["answer"]} for r in rows], encoded_prompts=[torch.tensor([i]) for i in range(8)],
            generate=lambda q: Generation(list(q), [torch.tensor([3])] * len(q), ["x"] * len(q)), reward=reward,
            reward_keywords=("answer",), eos_token_ids=[0], local_batch=local_batch, device=torch.device("cpu"))
        got = _sample(stub)
        assert got.columns["answer"] == [a for _, a in seen]
        return seen

    halves = share(0, 2, 4) + share(1, 2, 4)
    assert halves == share(0, 1, 8)  # the two shares are the one-process batch, in order
    assert all(answer == f"answer-{int(text)}" for text, answer in halves)  # each its own row's answer
    assert len({a for _, a in halves}) == 4  # four prompts x two completions
