"""Verifiable rewards: a completion checked against its prompt row's `answer` column, and a format check.

Each is a reward `(prompts, completions, answer) -> list[float]` (format_reward takes no answer), scoring 1.0 or
0.0, for `reward: tether.rewards.verifiable:exact_match` or a component of a reward spec:

- exact_match: the answer (the last `<answer>...</answer>` block if there is one, else the whole completion),
  with case, surrounding whitespace and quotes and a trailing full stop ignored, equals the reference;
- numeric_answer: the answer's last number equals the reference number (to 1e-6 relative); with no tags the
  completion's last number counts, as GSM8K-style graders do;
- math_answer: the answer and the reference are equivalent as mathematics, by Hugging Face's `math-verify`
  (LaTeX, fractions, sets, intervals, `\\boxed{}`); it needs `pip install 'tether[reasoning]'` and says so at
  set-up when that is missing;
- format_reward: the completion holds one non-empty `<answer>...</answer>` block and nothing after it.

A reference answer that is missing (None) is an error, which names the completion, like any failing reward."""

import math
import re

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
_FORMAT = re.compile(r"^\s*(?:.*?)<answer>\s*\S.*?</answer>\s*$", re.DOTALL | re.IGNORECASE)


def extract_answer(completion: str) -> str:
    """The content of the last `<answer>...</answer>` block, else the whole completion (stripped)."""
    blocks = ANSWER_TAG.findall(completion)
    return (blocks[-1] if blocks else completion).strip()


def _normalise(text: str) -> str:
    text = " ".join(str(text).split()).strip().strip("\"'`").strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def _number(text: str) -> float | None:
    """The last number in `text` (thousands commas allowed), None when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _references(answer, n: int) -> list:
    if answer is None:
        raise ValueError("this reward needs an `answer` column in the prompts (one reference answer per row)")
    if len(answer) != n:
        raise ValueError(f"got {len(answer)} answers for {n} completions")
    for i, a in enumerate(answer):
        if a is None:
            raise ValueError(f"completion {i} has no reference answer (its prompt row's `answer` is missing)")
    return list(answer)


def exact_match(prompts: list[str], completions: list[str], answer: list) -> list[float]:
    """1.0 where the extracted answer equals the reference, ignoring case and surrounding whitespace/quotes."""
    refs = _references(answer, len(completions))
    return [float(_normalise(extract_answer(c)).casefold() == _normalise(str(a)).casefold() and bool(c.strip()))
            for c, a in zip(completions, refs)]


def numeric_answer(prompts: list[str], completions: list[str], answer: list) -> list[float]:
    """1.0 where the extracted answer's last number equals the reference number (relative tolerance 1e-6)."""
    scores = []
    for i, (c, a) in enumerate(zip(completions, _references(answer, len(completions)))):
        ref = a if isinstance(a, (int, float)) and not isinstance(a, bool) else _number(str(a))
        if ref is None:
            raise ValueError(f"completion {i}: the reference answer {a!r} is not a number")
        got = _number(extract_answer(c))
        scores.append(float(got is not None and math.isclose(got, float(ref), rel_tol=1e-6, abs_tol=1e-9)))
    return scores


def _math_verify():
    try:
        import math_verify
    except ImportError as err:
        raise ModuleNotFoundError("the math_answer reward needs Hugging Face's `math-verify` package: "
                                  "pip install 'tether[reasoning]'  (or: pip install math-verify)") from err
    return math_verify


def math_answer(prompts: list[str], completions: list[str], answer: list) -> list[float]:
    """1.0 where math-verify finds the extracted answer equivalent to the reference (gold parsed first)."""
    mv = _math_verify()
    scores = []
    for c, a in zip(completions, _references(answer, len(completions))):
        gold = mv.parse(a if str(a).lstrip().startswith("$") else f"${a}$")
        pred = mv.parse(extract_answer(c)) if c.strip() else []
        scores.append(float(bool(gold) and bool(pred) and mv.verify(gold, pred)))
    return scores


math_answer.check_requirements = _math_verify  # called by resolve_reward, before any model loads


def format_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 where the completion holds exactly one non-empty <answer>...</answer> block, with nothing after it."""
    return [float(len(ANSWER_TAG.findall(c)) == 1 and bool(_FORMAT.match(c))) for c in completions]
