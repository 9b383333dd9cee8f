"""The offline text domains: text that Python and the installed packages ship, read the same way on every run.

==============  ================================================================================================
domain          what it is
==============  ================================================================================================
python-code     the public modules of Python's standard library (``sysconfig``'s ``stdlib``, ``*.py`` at its top
                level, sorted by name), as code only: parsed with ``ast`` and written back with ``ast.unparse``
                after every module, class and function docstring is removed, so no docstring and no comment is left
python-docs     the prose of the same modules: their docstrings and comments (``tokenize``), in source order
package-docs    the licences and descriptions (``METADATA`` bodies: most are the project's README) that the
                installed distributions ship in ``site-packages/*.dist-info``, sorted by path
==============  ================================================================================================

Why these three: they are on every machine that runs this package, need no download, and make a real domain shift for
a language model: from Python code, to English about that code (the same identifiers, a different grammar), to legal
and project prose in markdown and reStructuredText. ``python-code`` and ``python-docs`` are disjoint by construction
(what one keeps, the other drops). A document that repeats lines already seen in its domain (the same licence in a
dozen packages, another copyright line) is dropped, so one text never lands in both a training and a test block.

The domains depend on the Python version (its standard library) and on the installed distributions; this package's
own distribution is left out (its README changes with the code). The same environment always gives the same text.
"""

from __future__ import annotations

import ast
import io
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

OFFLINE_DOMAINS = ("python-code", "python-docs", "package-docs")
OWN_DISTRIBUTIONS = ("mpopt_hf", "mpopt-hf")  # this project's editable install: its README is not shipped text
_MIN_LINE = 20  # lines shorter than this (blank, "}", "License") say nothing about duplication
_DUPLICATE_SHARE = 0.5  # a document with at least this share of its lines already seen in the domain is dropped


def stdlib_files() -> list[Path]:
    """The public top-level modules of the standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if not p.name.startswith("_") and p.is_file())


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def code_of(source: str) -> str:
    """``source`` as code only: no docstring, no comment (``ast.unparse`` writes none)."""
    return ast.unparse(_without_docstrings(ast.parse(source)))


def prose_of(source: str) -> str:
    """The docstrings and comments of ``source``, in the order they appear."""
    pieces: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                pieces.append((node.body[0].lineno, doc))
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                text = token.string.lstrip("#").strip()
                if text and not text.startswith(("!", "-*-")):  # shebangs and coding lines
                    pieces.append((token.start[0], text))
    except (tokenize.TokenError, SyntaxError):
        pass
    return "\n".join(text for _, text in sorted(pieces, key=lambda p: p[0]))


def _stdlib_documents(extract) -> Iterator[tuple[str, str]]:
    for path in stdlib_files():
        try:
            text = extract(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a module this Python cannot parse (none today) is left out, not guessed at
        yield path.name, text


def _metadata_body(text: str) -> str:
    """The description of a ``METADATA`` file: what follows its header block."""
    head, _, body = text.partition("\n\n")
    return body if head.startswith("Metadata-Version") else text


def _package_documents() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["purelib"])
    for info in sorted(root.glob("*.dist-info")):
        if info.name.split("-")[0].lower().replace("_", "-") in {d.replace("_", "-") for d in OWN_DISTRIBUTIONS}:
            continue
        files = sorted(p for p in info.rglob("*") if p.is_file()
                       and ("LICEN" in p.name.upper() or "COPYING" in p.name.upper() or p.name == "METADATA"))
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            yield str(path.relative_to(root)), _metadata_body(text) if path.name == "METADATA" else text


def _sources(domain: str) -> Iterator[tuple[str, str]]:
    if domain == "python-code":
        return _stdlib_documents(code_of)
    if domain == "python-docs":
        return _stdlib_documents(prose_of)
    if domain == "package-docs":
        return _package_documents()
    raise ValueError(f"Unknown offline text domain {domain!r}; known: {list(OFFLINE_DOMAINS)}.")


def dedupe(documents: Iterator[tuple[str, str]], max_chars: int, max_chars_per_document: int) -> list[tuple[str, str]]:
    """``(name, text)`` documents, each cut to ``max_chars_per_document``, until ``max_chars`` in all; a document
    whose lines are mostly ones already seen is dropped (near-duplicate licences)."""
    seen: set[str] = set()
    kept: list[tuple[str, str]] = []
    total = 0
    for name, text in documents:
        text = text.strip()[:max_chars_per_document]
        lines = {line.strip() for line in text.splitlines() if len(line.strip()) >= _MIN_LINE}
        if not text or (lines and len(lines & seen) >= _DUPLICATE_SHARE * len(lines)):
            continue
        seen |= lines
        text = text[: max_chars - total]
        kept.append((name, text))
        total += len(text)
        if total >= max_chars:
            break
    return kept


def offline_documents(domain: str, max_chars: int, max_chars_per_document: int) -> list[tuple[str, str]]:
    """The ``(name, text)`` documents of an offline domain, in a fixed order, at most ``max_chars`` characters."""
    return dedupe(_sources(domain), max_chars, max_chars_per_document)
