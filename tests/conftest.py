"""Tiny real transformers parts, built in the test: a word-level tokenizer and a random GPT-2."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

WORDS = ("the a good bad movie film plot actor scene great awful fine dull fun long short story music "
         "i you we it was is and but so very not really quite").split()


def make_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"<eos>": 0, "<unk>": 1}
    if pad:
        vocab["<pad>"] = len(vocab)
    for w in WORDS:
        vocab[w] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import decoders
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>" if pad else None)


def make_model(vocab_size: int, seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_positions: int = 64):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=n_positions,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def model(tokenizer):
    return make_model(len(tokenizer))


def assert_close64(actual, expected, atol: float = 1e-6) -> None:
    """Absolute-tolerance comparison in float64, for hand-computed expectations."""
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)
