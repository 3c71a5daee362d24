"""Conversations: prompts given as chat messages, rendered with the tokenizer's chat template.

The ids sampled from (and scored) are `apply_chat_template(messages, add_generation_prompt=True,
tokenize=True)` taken as they come, never decoded and re-encoded. The reward sees the same prompt as text
(the template rendered without tokenising), so a reward model scores `prompt + completion` as the policy saw it;
samples and the report show the conversation as `role: content` lines."""

from importlib.resources import files
from pathlib import Path

from tether.data import PromptRows, load_prompt_rows

SHIPPED_TEMPLATES = {"chatml": "chatml.jinja"}  # names a `chat_template` key may hold, files in tether/data/


def is_conversation(prompt) -> bool:
    return isinstance(prompt, (list, tuple))


def read_chat_template(spec: str) -> str:
    """The template text of `spec`: a shipped template's name (chatml) or a file path."""
    if spec in SHIPPED_TEMPLATES:
        return (files("tether") / "data" / SHIPPED_TEMPLATES[spec]).read_text(encoding="utf-8")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"chat_template {spec!r} is neither a template shipped with tether "
                                f"({sorted(SHIPPED_TEMPLATES)}) nor an existing file")
    text = path.read_text(encoding="utf-8")
    if "{" not in text:
        raise ValueError(f"chat_template file {spec!r} holds no Jinja template (no '{{' in it)")
    return text


def set_chat_template(tokenizer, spec: str | None) -> None:
    """Give the tokenizer the `chat_template` key's template (replacing its own); None: leave it as it is."""
    if spec:
        tokenizer.chat_template = read_chat_template(spec)


def check_conversations(tokenizer, prompts: list, where: str) -> None:
    """Refuse conversations when the tokenizer has no chat template: before any model is loaded."""
    first = next((i for i, p in enumerate(prompts) if is_conversation(p)), None)
    if first is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}, row {first} is a conversation (a list of chat messages), but the tokenizer has "
                         f"no chat template to render it with. Set the config key `chat_template` to a template "
                         f"file or to one shipped with tether ({', '.join(sorted(SHIPPED_TEMPLATES))}), or give "
                         f"the prompts as plain strings")


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of a conversation with the generation prompt, as the chat template makes them."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys") and "input_ids" in out:  # transformers 5 returns a BatchEncoding by default
        out = out["input_ids"]
    return list(out)


def reward_text(tokenizer, prompt) -> str:
    """The prompt as the reward sees it: a string as is, a conversation as its template renders it."""
    if not is_conversation(prompt):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def readable(prompt) -> str:
    """A prompt for people: a string as is, a conversation as `role: content` lines."""
    if not is_conversation(prompt):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def load_chat_prompts(source, column: str, tokenizer, where: str = "prompts") -> PromptRows | None:
    """The prompt rows of `source` (None when there is none), conversations checked against the template."""
    if source is None or (isinstance(source, str) and not source):
        return None
    rows = load_prompt_rows(source, column)
    check_conversations(tokenizer, rows.prompts, where if not isinstance(source, str) else f"{where} {source!r}")
    return rows
