"""Bad reward-model data is refused before any weights load, with an error that names the row and key."""

import json

import pytest

from tether.reward_config import RewardConfig
from tether.trainers.reward import RewardTrainer

GOOD = {"prompt": "the movie was", "chosen": " good", "rejected": " bad"}


def train_on(rows, tmp_path, **overrides):
    # model="no/such/model": the data checks must fail first, or this would fail to load a model instead
    cfg = RewardConfig(model="no/such/model", output_dir=str(tmp_path / "rm"), eval_fraction=0, **overrides)
    return RewardTrainer(cfg, data=rows)


@pytest.mark.parametrize("bad, error, message", [
    ({"prompt": "x", "rejected": " bad"}, ValueError, r"row 2: 'chosen' is missing \(row has \['prompt', 'rejected'\]\)"),
    ({"prompt": "x", "chosen": " good"}, ValueError, "row 2: 'rejected' is missing"),
    ({"prompt": "x", "chosen": None, "rejected": " bad"}, ValueError, "row 2: 'chosen' is missing"),
    ({"prompt": "x", "chosen": "   ", "rejected": " bad"}, ValueError, "row 2: 'chosen' is empty"),
    ({"prompt": "x", "chosen": " good", "rejected": ""}, ValueError, "row 2: 'rejected' is empty"),
    ({"prompt": "x", "chosen": 3, "rejected": " bad"}, TypeError, "row 2: 'chosen' must be a string, got int 3"),
    ({"prompt": ["x"], "chosen": " a", "rejected": " b"}, TypeError, "row 2: 'prompt' must be a string, got list"),
    ({"chosen": " a", "rejected": " b", "margin": "big"}, ValueError, "row 2: 'margin' = 'big' is not a number"),
])
def test_bad_pair_rows_name_the_row(tmp_path, bad, error, message):
    with pytest.raises(error, match=message):
        train_on([GOOD, GOOD, bad, GOOD], tmp_path)


@pytest.mark.parametrize("bad, error, message", [
    ({"text": "fine"}, ValueError, "row 1: 'label' is missing"),
    ({"text": "fine", "label": "high"}, ValueError, "row 1: 'label' = 'high' is not a number"),
    ({"text": "fine", "label": True}, TypeError, "row 1: 'label' must be a number, got bool"),
    ({"text": "fine", "label": float("nan")}, ValueError, "row 1: 'label' is nan, not a finite number"),
    ({"text": "", "label": 1.0}, ValueError, "row 1: 'text' is empty"),
    ({"label": 1.0}, ValueError, "row 1: 'text' is missing"),
])
def test_bad_labelled_rows_name_the_row(tmp_path, bad, error, message):
    with pytest.raises(error, match=message):
        train_on([{"text": "good", "label": 1.0}, bad], tmp_path, objective="regression")


def test_file_errors_name_the_file_and_row(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": "x", "chosen": 7, "rejected": "y"}) + "\n")
    with pytest.raises(TypeError, match=r"reward data file '.*pairs.jsonl', row 1: 'chosen' must be a string"):
        train_on(str(path), tmp_path)
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        train_on(str(path), tmp_path)
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\nthe,good,bad\nthe,,bad\n")
    with pytest.raises(ValueError, match="row 1: 'chosen' is empty"):
        train_on(str(csv), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_on(str(tmp_path / "missing.jsonl"), tmp_path)
    with pytest.raises(ValueError, match=r"expected one of \['.jsonl', '.json', '.csv'\]"):
        train_on(str(tmp_path / "pairs.txt"), tmp_path)


def test_wrong_shape_of_data(tmp_path):
    with pytest.raises(ValueError, match=r"needs rows with `chosen` and `rejected` \(or `text` and `label`\); "
                                         r"row 0 has \['answer', 'question'\]"):
        train_on([{"question": "q", "answer": "a"}], tmp_path)
    with pytest.raises(ValueError, match="objective=regression needs rows with `text` and `label`"):
        train_on([GOOD], tmp_path, objective="regression")
    with pytest.raises(TypeError, match="row 1: expected an object with named fields, got str"):
        train_on([GOOD, "good > bad"], tmp_path)
    with pytest.raises(ValueError, match="reward data is empty"):
        train_on([], tmp_path)
    with pytest.raises(ValueError, match="no prompt has two texts with different labels"):
        train_on([{"text": "a", "label": 1}, {"text": "b", "label": 1}], tmp_path)


def test_missing_backbone_is_named(tmp_path):
    with pytest.raises(ValueError, match="no backbone: set `model`"):
        RewardTrainer(RewardConfig(output_dir=str(tmp_path)), data=[GOOD, GOOD])
