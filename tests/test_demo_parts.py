"""The offline sentiment demo's reward (VADER) and prompts (the bundled review openings)."""

import pytest

from tether.demo import movie_review_openings, vader_reward


def test_vader_reward_signs_count_and_type():
    pytest.importorskip("vaderSentiment")
    completions = [
        "a wonderful, moving masterpiece. I loved every minute and the acting was brilliant.",
        "a boring, awful mess. The worst film I have seen, a terrible waste of time.",
        "",
    ]
    scores = vader_reward(["p1", "p2", "p3"], completions)
    assert len(scores) == 3 and all(type(s) is float for s in scores)
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0


def test_vader_reward_ignores_the_prompt():
    pytest.importorskip("vaderSentiment")
    text = "It was fine."
    assert vader_reward(["A horrible, hateful opening"], [text]) == vader_reward(["A lovely opening"], [text])


def test_vader_reward_length_mismatch():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        vader_reward(["a", "b"], ["x"])


def test_movie_review_openings():
    openings = movie_review_openings()
    assert len(openings) >= 300
    assert len(set(openings)) == len(openings)
    for line in openings:
        assert line and line == line.strip()
        assert 4 <= len(line.split()) <= 12, line
