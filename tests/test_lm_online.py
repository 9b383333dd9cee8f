"""lm_online's units: the offline text domains (deterministic, disjoint, padded blocks), local text files as domains,
bad flags refused by name, too little text refused, and GPT-Neo-125M's architecture built from the config values
in the code. The recipe end to end: tests/test_recipe_gpt_neo_lm_online.py."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import numpy as np
import pytest

from lm_online.data import DataArguments, load_domains, train_tokenizer
from lm_online.modeling import GPT_NEO_125M_ID, build_model
from lm_online.run import parse
from lm_online.text import offline_documents
from test_recipe_gpt_neo_lm_online import SMALL_TEXT  # the recipe's short text flags


# ---------------------------------------------------------------------------- the text domains


def _code_and_prose():
    return offline_documents("python-code", 20_000, 8_000), offline_documents("python-docs", 20_000, 8_000)


def test_offline_domains_are_deterministic_and_disjoint():
    code, prose = _code_and_prose()
    assert (code, prose) == _code_and_prose()  # the same text every time
    assert [name for name, _ in code] == [name for name, _ in prose][: len(code)]  # modules in name order
    for name, text in code:  # code only: valid Python with no docstring and no comment
        tree = ast.parse(text if len(text) < 8_000 else text[: text.rfind("\n\n")])  # cut documents end anywhere
        assert all(ast.get_docstring(n) is None for n in ast.walk(tree)
                   if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))), name
        try:
            assert not any(t.type == tokenize.COMMENT for t in tokenize.generate_tokens(io.StringIO(text).readline))
        except tokenize.TokenError:
            pass  # the cut end of a document
    first_docstring = ast.get_docstring(ast.parse(Path(ast.__file__).with_name(code[0][0]).read_text()))
    assert first_docstring in prose[0][1] and first_docstring not in code[0][1]  # prose: comments and docstrings
    packages = offline_documents("package-docs", 60_000, 8_000)
    assert packages and not any("mpopt" in name.lower() for name, _ in packages)  # not this project's README
    lines = [{line.strip() for line in text.splitlines() if len(line.strip()) >= 20} for _, text in packages]
    for i, a in enumerate(lines):  # no near-duplicate licence twice
        for b in lines[:i]:
            assert len(a & b) < 0.5 * len(a), packages[i][0]


def test_blocks_are_padded_with_ignored_labels_and_splits_share_no_block():
    data = DataArguments(block_size=32, max_chars_per_domain=6000, test_blocks_per_task=8, train_blocks_per_task=16)
    tokenizer, source, targets = load_domains(data, lambda docs: train_tokenizer(docs, 300))
    assert len(tokenizer) == 300 and source.name == "python-code" and [t.name for t in targets] == ["python-docs",
                                                                                                    "package-docs"]
    assert [t.sizes for t in targets] == [{"train": 16, "val": 8, "test": 8}] * 2
    again = load_domains(data, lambda docs: tokenizer)[2]
    assert all(a.test["input_ids"] == b.test["input_ids"] for a, b in zip(targets, again))  # deterministic
    seen: dict[tuple, str] = {}
    padded = 0
    for task in [source, *targets]:
        for split in ("train", "val", "test"):
            rows = getattr(task, split).with_format("numpy")[:]
            ids, mask, labels = rows["input_ids"], rows["attention_mask"], rows["labels"]
            assert ids.shape[1] == 32 and (labels == np.where(mask == 1, ids, -100)).all()
            assert (mask.sum(1) >= 8).all() and (np.diff(mask, axis=1) <= 0).all()  # real tokens first, then pad
            padded += int((mask == 0).any(1).sum())
            for row in map(tuple, ids):
                assert seen.setdefault(row, f"{task.name}/{split}") == f"{task.name}/{split}", "a block twice"
    assert padded > 0  # documents' short last blocks are kept, padded


def test_local_text_files_and_folders_are_domains(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("# Notes\n\n" + "Markdown about the weather and the sea. " * 60)
    (tmp_path / "notes" / "b.txt").write_text("Plain text about trains, stations and timetables. " * 60)
    (tmp_path / "notes" / "skip.bin").write_bytes(b"\0\1")
    (tmp_path / "poem.txt").write_text("Roses are red, violets are blue, sugar is sweet. " * 80)
    data = DataArguments(dataset=[str(tmp_path / "poem.txt"), str(tmp_path / "notes")], block_size=16,
                         test_blocks_per_task=4, train_blocks_per_task=8)
    tokenizer, source, targets = load_domains(data, lambda docs: train_tokenizer(docs, 280))
    assert (source.name, [t.name for t in targets]) == ("poem.txt", ["notes"])
    assert targets[0].domain["documents"] == 2 and targets[0].sizes == {"train": 8, "val": 4, "test": 4}

    files = [(tmp_path / "notes" / name).read_text() for name in ("a.md", "b.txt")]
    for split in ("train", "val", "test"):  # a block is a span of one document of its folder (byte-level: exact)
        for ids in getattr(targets[0], split)["input_ids"]:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            assert text and any(text in f for f in files), text
    poem = (tmp_path / "poem.txt").read_text()
    assert all(tokenizer.decode(ids, skip_special_tokens=True) in poem for ids in source.train["input_ids"])


# ---------------------------------------------------------------------------- flags and models


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--num_layers", "3"], r"ModelArguments\.num_layers 3 must be even"),
        (["--hidden_size", "30", "--num_heads", "4"], r"hidden_size 30 must be a multiple of num_heads 4"),
        (["--random_init", "true"], r"ModelArguments\.random_init: 'tiny-gpt-neo' is always built from its config"),
        (["--model", GPT_NEO_125M_ID, "--random_init", "true", "--num_layers", "2"],
         r"ModelArguments\.num_layers 2: --num_layers shapes the 'tiny-gpt-neo' model only"),
        (["--model", "/nonexistent/gpt-neo"], r"ModelArguments\.model \(--model\) '/nonexistent/gpt-neo': the local path /nonexistent/gpt-neo does not exist"),
        (["--vocab_size", "100"], r"ModelArguments\.vocab_size must be an int in 260\.\.50257 \(256 bytes, .*\), got 100"),
        (["--dataset", "nosuch.txt"], r"DataArguments\.dataset \(--dataset\) entry 'nosuch\.txt' is no built-in domain"),
        (["--dataset", "python-code", "python-code"], r"names a domain twice"),
        (["--block_size", "2"], r"DataArguments\.block_size must be an int >= 4, got 2"),
        (["--min_block_tokens", "100"], r"DataArguments\.min_block_tokens must be an int in 2\.\.block_size \(64\)"),
        (["--test_blocks_per_task", "0"], r"DataArguments\.test_blocks_per_task must be an int >= 1, got 0"),
        (["--baseline", "best"], r"RunArguments\.baseline must be one of"),
        (["--fixed_config", "mb8"], r"fixed_config 'mb8' is only used by --baseline fixed"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        parse(["--output_dir", str(tmp_path), *flags])


def test_a_stream_with_only_a_source_or_too_little_text_is_refused(tmp_path):
    from lm_online.run import load_stream

    model, data, *_ = parse(["--output_dir", str(tmp_path), "--cache_dir", str(tmp_path), "--dataset", "python-code",
                             *SMALL_TEXT])
    with pytest.raises(ValueError, match=r"with source pre-training the first domain is the source; give at least one"):
        load_stream(model, data)
    model, data, *_ = parse(["--output_dir", str(tmp_path), "--cache_dir", str(tmp_path), *SMALL_TEXT[:-4],
                             "--test_blocks_per_task", "500"])
    with pytest.raises(ValueError, match=r"Domain 'python-code' has \d+ blocks of 32 tokens: too few for "
                                         r"--test_blocks_per_task 500"):
        load_stream(model, data)


def test_random_init_builds_gpt_neo_125m_exactly_on_the_meta_device(tmp_path):
    import torch

    model_args, data, *_ = parse(["--output_dir", str(tmp_path), "--model", GPT_NEO_125M_ID, "--random_init", "true"])
    assert model_args.pretrain_steps == 0 and model_args.offline_tokenizer  # no checkpoint: the offline BPE

    class _Vocab:  # the offline tokenizer's size is all build_model asks of it
        def __len__(self):
            return 1024

    with torch.device("meta"):
        model = build_model(model_args, _Vocab(), data.block_size)
    config = model.config
    assert (config.hidden_size, config.num_layers, config.num_heads, config.vocab_size) == (768, 12, 12, 50257)
    assert config.max_position_embeddings == 2048 and config.window_size == 256
    assert config.attention_layers == ["global", "local"] * 6
    d, vocab, positions, layers = 768, 50257, 2048, 12
    per_layer = 2 * 2 * d + 3 * d * d + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)  # LNs, qkv, out, MLP
    expected = vocab * d + positions * d + layers * per_layer + 2 * d  # tied lm_head, final LN
    assert expected == 125_198_592
    assert sum(p.numel() for p in model.parameters()) == expected
    assert next(model.parameters()).device.type == "meta"  # nothing allocated
