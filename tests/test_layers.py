"""The import graph runs one way: inside mpopt_hf, each layer imports only the layers below it (README "Layout"),
and mpopt_hf imports none of the packages built on it. Read from the source (AST): an import statement inside a
function counts too. Imports by name at run time are not seen: the packages' lazy exports (`lazy_exports`, maps of
their own submodules) and the CLI's `importlib.import_module("small_cnn")` when a user asks for a zoo model."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mpopt_hf"

# bottom up; a module's layer is that of its first path part (a top-level module's own name)
LAYERS: list[set[str]] = [
    {"config", "lazy_exports", "budget", "metrics", "__init__"},
    {"model", "space"},
    {"training"},
    {"profiler", "memory_model", "store", "cost", "engine"},
    {"callback"},
    {"online", "report", "report_timeline"},
    {"cli", "testing"},
]
# the one upward import, on purpose: MPOptTrainer(mpopt_args=...) builds the MPOptCallback that steers it
ALLOWED_UPWARD = {("training.trainer", "callback.callback")}
OUTSIDE = {"small_cnn", "vision", "clip_online", "cnn_online", "online_recipe", "lm_online", "vit_online",
           "sam_online", "memory_cards", "recipes", "reproduce", "bench"}


def _layer(module: str) -> int:
    head = module.split(".")[0]
    for index, names in enumerate(LAYERS):
        if head in names:
            return index
    raise AssertionError(f"mpopt_hf.{module} is in no layer of tests/test_layers.py: add it where it belongs")


def _imports(path: pathlib.Path) -> list[str]:
    """The mpopt_hf modules (relative to the package) and outside packages that ``path`` imports."""
    module = path.relative_to(ROOT).with_suffix("").parts
    package = list(module if module[-1] == "__init__" else module[:-1])
    if package and package[-1] == "__init__":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                names = [target + [a.name] for a in node.names] if not node.module else [target]
                found += [".".join(n) for n in names]
            elif node.module:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_module_imports_only_lower_layers(path):
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    own = _layer(name) if name != "__init__" else 0
    for target in _imports(path):
        head = target.split(".")[0]
        assert head not in OUTSIDE, f"mpopt_hf.{name} imports {target}: mpopt_hf must not import the packages on it"
        if head == "mpopt_hf":
            target = target[len("mpopt_hf."):]
        elif target.split(".")[0] not in {n for layer in LAYERS for n in layer}:
            continue  # the standard library and third-party packages
        if not target or target == "__init__":
            continue
        short = ".".join(target.split(".")[:2])
        if (name, short) in ALLOWED_UPWARD or name == "__init__":
            continue
        assert _layer(target) <= own, f"mpopt_hf.{name} (layer {own}) imports mpopt_hf.{target} (layer {_layer(target)})"


def test_the_engine_imports_nothing_but_the_config_the_knob_arithmetic_and_itself():
    for path in (ROOT / "engine").rglob("*.py"):
        for target in _imports(path):
            head = target.split(".")[0] if not target.startswith("model.") else target
            assert head in {"engine", "config", "model.plan", "space", "__future__", "math", "collections", "dataclasses", "typing",
                            "enum", "itertools", "statistics", "functools", "json", "time", "bisect", "types"}, (path, target)
