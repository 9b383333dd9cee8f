"""The text stream of the causal-LM recipe: domains of documents, a tokenizer, fixed-length token blocks, tasks.

Each ``--dataset`` entry is one domain, in stream order: a built-in offline domain (``lm_online.text``), a local
text file (one document), a folder (each ``*.txt``/``*.md``/``*.rst`` in it, sorted, one document), or a Hugging Face
data set id (``name`` or ``name:config``; each row's ``--text_column`` a document, read from the local cache unless
``--local_files_only false``). With source pre-training the first domain is the source and the rest the targets.

Every document is tokenized on its own with an end-of-text token appended and cut into blocks of ``--block_size``
tokens; its last, short block is padded (``attention_mask`` 0, ``labels`` -100, so the loss and the perplexity
count only real tokens), or dropped under ``--min_block_tokens``. A domain's blocks are split by one seeded
permutation: the first ``--test_blocks_per_task`` are its test split, the next as many its val split (the engine's
probe), then up to ``--train_blocks_per_task`` its training split (a source's training split takes all the rest):
the splits never share a token of text.

The offline tokenizer is a byte-level BPE (``tokenizers``) trained on the first domain's text in about a second
and cached by a digest of that text: byte-level, so no text of a later domain is ever out of vocabulary.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpopt_hf.config import check_int, check_list, check_str

from .text import OFFLINE_DOMAINS, dedupe, offline_documents

EOT = "<|endoftext|>"  # GPT-Neo's end-of-text token, also the padding token (padded positions carry no label)
TEXT_SUFFIXES = (".txt", ".md", ".rst")
# a Hugging Face hub id, ``name`` or ``org/name``, with an optional ``:config``
_HUB_ID = re.compile(r"(?!.*\.\.)(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)?[A-Za-z0-9_][A-Za-z0-9_.-]*(?::[A-Za-z0-9_.-]+)?")


@dataclass
class DataArguments:
    dataset: list[str] = field(
        default_factory=lambda: list(OFFLINE_DOMAINS),
        metadata={"help": f"The domains, in stream order: built-in {list(OFFLINE_DOMAINS)}, a text file, a folder of "
                  "text files, or a hub data set id (name or name:config). With pre-training the first is the source."},
    )
    text_column: str = field(default="text", metadata={"help": "Hub data sets: the column holding the text."})
    dataset_split: str = field(default="train", metadata={"help": "Hub data sets: the split read."})
    block_size: int = field(default=64, metadata={"help": "Tokens per block (one training sample)."})
    min_block_tokens: int = field(
        default=8, metadata={"help": "A document's last block shorter than this is dropped; longer ones are padded."}
    )
    train_blocks_per_task: int = field(default=256, metadata={"help": "At most this many training blocks per task."})
    test_blocks_per_task: int = field(default=64, metadata={"help": "Test blocks per domain (and as many val blocks)."})
    max_chars_per_domain: int = field(default=200_000, metadata={"help": "Characters read per domain, at most."})
    max_chars_per_document: int = field(
        default=16_000, metadata={"help": "Characters kept of one document (a long module, a README), at most."}
    )
    stream_seed: int = field(default=0, metadata={"help": "Seed of the block permutation that makes the splits."})

    def __post_init__(self) -> None:
        where = "DataArguments."
        self.dataset = check_list(where + "dataset (--dataset)", self.dataset, lambda d: isinstance(d, str) and d,
                                  f"domains: {list(OFFLINE_DOMAINS)}, text files, folders or hub data set ids")
        for entry in self.dataset:
            domain_kind(entry)  # an entry that is none of them fails here, naming it
        if len(set(self.dataset)) != len(self.dataset):
            raise ValueError(f"DataArguments.dataset (--dataset) names a domain twice: {self.dataset}; each entry is "
                             "one domain of the stream.")
        check_str(where + "text_column", self.text_column, "a column name")
        check_str(where + "dataset_split", self.dataset_split, "a split name such as 'train'")
        self.block_size = check_int(where + "block_size", self.block_size, lambda v: v >= 4, "an int >= 4")
        self.min_block_tokens = check_int(where + "min_block_tokens", self.min_block_tokens,
                                          lambda v: 2 <= v <= self.block_size, f"an int in 2..block_size "
                                          f"({self.block_size})")
        for name in ("train_blocks_per_task", "test_blocks_per_task"):
            setattr(self, name, check_int(where + name, getattr(self, name), lambda v: v >= 1, "an int >= 1"))
        self.max_chars_per_domain = check_int(where + "max_chars_per_domain", self.max_chars_per_domain,
                                              lambda v: v >= 100, "an int >= 100")
        self.max_chars_per_document = check_int(where + "max_chars_per_document", self.max_chars_per_document,
                                                lambda v: v >= 10, "an int >= 10")
        self.stream_seed = check_int(where + "stream_seed", self.stream_seed, lambda v: v >= 0, "an int >= 0")


def domain_kind(entry: str) -> str:
    """``"offline"``, ``"file"``, ``"folder"`` or ``"hub"``; anything else raises, naming the entry."""
    if entry in OFFLINE_DOMAINS:
        return "offline"
    path = os.path.expanduser(entry)
    if os.path.isfile(path):
        return "file"
    if os.path.isdir(path):
        return "folder"
    if _HUB_ID.fullmatch(entry) and not entry.endswith(TEXT_SUFFIXES):
        return "hub"
    raise ValueError(f"DataArguments.dataset (--dataset) entry {entry!r} is no built-in domain "
                     f"({list(OFFLINE_DOMAINS)}), no existing file or folder ({os.path.abspath(path)}) and no hub "
                     "data set id (name, org/name or name:config).")


def domain_name(entry: str) -> str:
    """The task name of a domain: the built-in name, the file or folder name, or the hub id."""
    kind = domain_kind(entry)
    return Path(entry).name if kind in ("file", "folder") else entry


def documents(entry: str, data: DataArguments, local_files_only: bool = True) -> list[tuple[str, str]]:
    """The ``(name, text)`` documents of one domain, in a fixed order, within the character caps."""
    kind = domain_kind(entry)
    caps = (data.max_chars_per_domain, data.max_chars_per_document)
    if kind == "offline":
        return offline_documents(entry, *caps)
    if kind == "file":
        path = Path(os.path.expanduser(entry))
        return dedupe(iter([(path.name, path.read_text(encoding="utf-8", errors="replace"))]), *caps)
    if kind == "folder":
        root = Path(os.path.expanduser(entry))
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"DataArguments.dataset (--dataset) folder {entry!r} holds no {list(TEXT_SUFFIXES)} "
                             "files.")
        return dedupe(((str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files),
                      *caps)
    import datasets

    name, _, config = entry.partition(":")
    rows = datasets.load_dataset(name, config or None, split=data.dataset_split,
                                 download_config=datasets.DownloadConfig(local_files_only=local_files_only))
    if data.text_column not in rows.column_names:
        raise ValueError(f"DataArguments.text_column {data.text_column!r} is not a column of {entry!r}; its columns "
                         f"are {rows.column_names}.")
    return dedupe(((f"{entry}[{i}]", str(t)) for i, t in enumerate(rows[data.text_column])), *caps)


# ---------------------------------------------------------------------------- the tokenizer


def text_digest(docs: list[tuple[str, str]]) -> str:
    """A digest of a domain's documents: what a tokenizer or a source model trained on them depends on."""
    digest = hashlib.sha256()
    for name, text in docs:
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


def train_tokenizer(docs: list[tuple[str, str]], vocab_size: int):
    """A byte-level BPE of ``vocab_size`` tokens (the end-of-text token included) trained on ``docs``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((text for _, text in docs), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOT, pad_token=EOT, bos_token=EOT)


def cached_tokenizer(docs: list[tuple[str, str]], vocab_size: int, cache_root: str | Path):
    """:func:`train_tokenizer`'s tokenizer, cached under ``cache_root`` by the text and the vocabulary size (written
    to a temporary folder and renamed, like the source model beside it)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(cache_root) / f"tokenizer-bpe{vocab_size}-{text_digest(docs)}"
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    tokenizer = train_tokenizer(docs, vocab_size)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tokenizer.save_pretrained(str(tmp))
    if path.exists():  # another run cached the same tokenizer meanwhile
        shutil.rmtree(tmp)
    else:
        tmp.replace(path)
    return tokenizer


# ---------------------------------------------------------------------------- blocks and tasks


@dataclass
class TextTask:
    """One domain of the stream: what `OnlineRetrainer` needs (``name``, ``train``, ``val``, ``test``)."""

    name: str
    train: Any
    val: Any
    test: Any
    domain: dict[str, Any] = field(default_factory=dict)

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def blocks(docs: list[tuple[str, str]], tokenizer, block_size: int, min_tokens: int) -> dict[str, np.ndarray]:
    """Every document's tokens (and an end-of-text token) cut into ``block_size`` blocks, the short last one padded:
    ``{"input_ids", "attention_mask", "labels"}`` int64 arrays of shape [blocks, block_size]."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows: list[list[int]] = []
    for _, text in docs:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        rows += [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    rows = [r for r in rows if len(r) >= min_tokens]
    n = len(rows)
    input_ids = np.full((n, block_size), pad, dtype=np.int64)
    mask = np.zeros((n, block_size), dtype=np.int64)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": np.where(mask == 1, input_ids, -100)}


def _dataset(arrays: dict[str, np.ndarray], index: np.ndarray):
    import datasets

    return datasets.Dataset.from_dict({k: v[index] for k, v in arrays.items()})


def split_task(name: str, arrays: dict[str, np.ndarray], data: DataArguments, source: bool, domain: dict) -> TextTask:
    """The task of one domain's blocks: test, val, then train from one seeded permutation (see the module)."""
    n, test = len(arrays["input_ids"]), data.test_blocks_per_task
    if n < 2 * test + 1:
        raise ValueError(f"Domain {name!r} has {n} blocks of {data.block_size} tokens: too few for "
                         f"--test_blocks_per_task {test} (test and val) and one training block; raise "
                         "--max_chars_per_domain or lower --test_blocks_per_task.")
    order = np.random.default_rng(data.stream_seed).permutation(n)
    end = n if source else min(n, 2 * test + data.train_blocks_per_task)
    return TextTask(name, _dataset(arrays, order[2 * test:end]), _dataset(arrays, order[test:2 * test]),
                    _dataset(arrays, order[:test]), domain)


def load_domains(data: DataArguments, tokenizer_for, local_files_only: bool = True, with_source: bool = True):
    """``(tokenizer, source task or None, target tasks)``. ``tokenizer_for(first_domain_documents)`` gives the
    tokenizer (the offline BPE is trained on them); with ``with_source`` the first domain is the source."""
    docs = [documents(entry, data, local_files_only) for entry in data.dataset]
    for entry, found in zip(data.dataset, docs):
        if not found:
            raise ValueError(f"DataArguments.dataset (--dataset) domain {entry!r} holds no text.")
    tokenizer = tokenizer_for(docs[0])
    tasks = [split_task(domain_name(entry), blocks(found, tokenizer, data.block_size, data.min_block_tokens), data,
                        source=with_source and i == 0,
                        domain={"domain": entry, "documents": len(found), "digest": text_digest(found)})
             for i, (entry, found) in enumerate(zip(data.dataset, docs))]
    if with_source and len(tasks) < 2:
        raise ValueError(f"DataArguments.dataset (--dataset) {data.dataset}: with source pre-training the first "
                         "domain is the source; give at least one more (a target), or --pretrain_steps 0.")
    return (tokenizer, tasks[0], tasks[1:]) if with_source else (tokenizer, None, tasks)
