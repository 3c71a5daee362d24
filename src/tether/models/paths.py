"""Local model folders checked before transformers reads them, so that a bad path says what was typed: a path
that does not exist (transformers would report it as a hub name breaking the repo-id rules), a file where a
folder is needed, or a folder without a config, weights or tokenizer, naming the file that is missing."""

from pathlib import Path

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def is_local(name: str) -> bool:
    """Whether `name` means a local path rather than a hub id (`org/name`): it exists, starts like a path
    (/, ., ~) or has more parts than a hub id."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~", "\\")) or name.count("/") > 1 \
        or "\\" in name


def check_model_folder(name, what: str = "model", weights: bool = True, tokenizer: bool = False) -> None:
    """FileNotFoundError naming `what` and the path typed when the local folder `name` does not exist, is a
    file, or lacks config.json, weights (when `weights`) or tokenizer files (when `tokenizer`). Hub names and
    modules pass unchecked."""
    if not isinstance(name, (str, Path)) or not str(name) or not is_local(str(name)):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(name)!r}: no such folder (it is read as a local path; a hub name "
                                f"looks like `org/name`)")
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {str(name)!r} is a file; it must be a folder as save_pretrained writes it "
                                f"(config.json, weights, tokenizer)")
    needed = [("config.json", ("config.json",), True), ("weights", WEIGHT_FILES, weights),
              ("tokenizer files", TOKENIZER_FILES, tokenizer)]
    for label, files, wanted in needed:
        if wanted and not any((path / f).is_file() for f in files):
            which = "" if len(files) == 1 else f" ({' / '.join(files)})"
            held = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise FileNotFoundError(f"{what} folder {str(name)!r} has no {label}{which}; it holds: {held}")
