"""Tiny models shared by the tests (an importable module, not a conftest, so any test file can
``from helpers_models import tiny_gpt2, save_tiny_hf_model, tiny_mlp``).

Everything is built offline: the GPT-2 from a config, the tokenizer trained on a built-in
corpus with the ``tokenizers`` library.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

VOCAB_SIZE = 97
N_POSITIONS = 32
SPECIAL_TOKENS = ["<unk>", "<pad>", "<eos>"]  # ids 0, 1, 2
UNK_ID, PAD_ID, EOS_ID = 0, 1, 2

CORPUS = [
    "the cat sat on the mat",
    "a dog ran to the park and back",
    "influence functions trace a prediction to training data",
    "low rank factors store gradients cheaply",
    "the quick brown fox jumps over the lazy dog",
    "streaming the index keeps memory bounded",
    "we attribute each query to the examples that helped it",
    "projections shrink every layer before the gradient is formed",
]


def tiny_gpt2(seed: int = 0):
    """A 2-layer, 32-wide GPT-2 (vocab 97, context 32), eager attention, eval mode, seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB_SIZE,
        n_positions=N_POSITIONS,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    return model.eval()


def tiny_tokenizer():
    """A BPE tokenizer with at most 97 tokens, trained offline on ``CORPUS``, wrapped in
    ``PreTrainedTokenizerFast`` (unk/pad/eos = ids 0/1/2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False)
    raw.train_from_iterator(CORPUS, trainer=trainer)
    assert raw.get_vocab_size() <= VOCAB_SIZE
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )


def save_tiny_hf_model(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Save ``tiny_gpt2(seed)`` and ``tiny_tokenizer()`` into ``directory`` (save_pretrained
    layout); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tiny_gpt2(seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    """``7 -> 12 -> 10 -> 3`` tanh MLP (Linear layers named "0", "2", "4"), eval mode, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(7, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)
    ).eval()
