"""A word-level tokenizer built in code, for the tiny offline CLIP.

The offline default must not download CLIP's BPE vocabulary, and a randomly
initialised tiny text tower gains nothing from it. This tokenizer lower-cases,
splits on words and punctuation, and maps each token to an id from a vocabulary
built over the prompt templates and class names it will see. Unknown words map
to ``<unk>``. Ids: ``<pad>``=0, ``<bos>``=1, ``<unk>``=2, ``<eos>``=3 (not 2:
transformers treats a CLIP text config with ``eos_token_id == 2`` as a legacy
checkpoint and pools at the largest id instead of at ``<eos>``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>", "<eos>")
PAD_ID, BOS_ID, UNK_ID, EOS_ID = range(4)
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class WordTokenizer:
    """``tokenizer(texts, return_tensors="pt")`` -> ``{"input_ids", "attention_mask"}``, padded to the longest."""

    def __init__(self, vocab: Sequence[str]):
        if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"WordTokenizer vocab must start with {list(SPECIAL_TOKENS)}, got {list(vocab[:4])}.")
        if len(set(vocab)) != len(vocab):
            raise ValueError("WordTokenizer vocab has duplicate tokens.")
        self.vocab = list(vocab)
        self.token_to_id = {token: i for i, token in enumerate(self.vocab)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "WordTokenizer":
        """A vocabulary of every word in ``texts`` (sorted, so the ids do not depend on the order given)."""
        words = sorted({w for text in texts for w in split_words(text)} - set(SPECIAL_TOKENS))
        return cls(list(SPECIAL_TOKENS) + words)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [BOS_ID] + [self.token_to_id.get(w, UNK_ID) for w in split_words(text)] + [EOS_ID]

    def __call__(self, texts: str | Sequence[str], return_tensors: str = "pt", **_: object) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode(t) for t in texts]
        length = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), length), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
