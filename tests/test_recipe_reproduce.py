"""reproduce/*.py end to end: every recipe's ``--quick`` run writes its card and results, the card checks against
them, an altered metric cell is caught and named, and the flags that cannot go together are refused."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from mpopt_hf.report import stream_metric
from online_recipe import reproduce
from online_recipe.model_card import RECIPES, parse_table

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "reproduce").glob("*.py"))  # a new script is picked up here
# the command line each script is over -> what a script's module holds of it; the memory cards' scripts
# (memory_cards.cli) measure knobs, not a recipe's stream, and are run by their own tests
CLIS = {"online_recipe.reproduce": "reproduce_main", "memory_cards.cli": "main"}


def _cli(path: Path) -> str | None:
    """The command line ``path`` imports (read from its text: collecting must not import every recipe)."""
    text = path.read_text(encoding="utf-8")
    return next((cli for cli in CLIS if f"from {cli} import" in text), None)


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"reproduce_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECIPE_SCRIPTS = [p for p in SCRIPTS if _cli(p) == "online_recipe.reproduce"]


def test_every_script_is_over_a_known_command_line():
    assert len(RECIPE_SCRIPTS) >= len(RECIPES)  # one per recipe at least
    for path in SCRIPTS:
        cli = _cli(path)
        assert cli is not None, f"{path.name}: over neither of {list(CLIS)}; give it a test"
        module = _load(path)
        entry = getattr(importlib.import_module(cli), CLIS[cli])
        assert any(value is entry for value in vars(module).values()) and callable(module.main), path.name
        if cli == "online_recipe.reproduce":
            assert module.QUICK_FLAGS and "--output_dir" in module.QUICK_FLAGS, path.name
            assert f"reproduce/{path.name}" in [again for _, again in RECIPES.values()], path.name  # cards name it
            assert f"python reproduce/{path.name} --quick" in module.__doc__, path.name  # its docstring shows it


def _altered(card: str, task: str, metric: str) -> str:
    """``card`` with ``task``'s "<metric> after" cell moved by 0.5 (far past the 3 decimals compared)."""
    row = next(r for r in parse_table(card) if r["task"] == task)
    line = "| " + " | ".join(row.values()) + " |"
    assert line in card, line
    row[f"{metric} after"] = f"{float(row[f'{metric} after']) + 0.5:.3f}"
    return card.replace(line, "| " + " | ".join(row.values()) + " |")


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("path", RECIPE_SCRIPTS, ids=lambda p: p.stem)
def test_quick_run_writes_a_card_that_checks_and_an_altered_cell_is_named(tmp_path, capsys, path):
    main = _load(path).main
    out = tmp_path / "out"
    # flags after --quick override its own: the card lands here, not in outputs/<recipe>_quick
    assert main(["--quick", "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache")]) == 0
    results, card = out / "results.json", out / "README.md"
    data = json.loads(results.read_text())
    assert len(data["tasks"]) >= 2 and data["summary"]["complete"]
    assert "--quick" not in data["summary"]["command"] and str(out) in data["summary"]["command"]
    capsys.readouterr()
    check = ["--from_results", str(results), "--check", str(card)]
    assert main(check) == 0
    assert "agrees with the run" in capsys.readouterr().out
    task, metric = data["tasks"][-1]["task"], stream_metric(data["tasks"]).metric
    card.write_text(_altered(card.read_text(), task, metric))
    assert main(check) == 1
    printed = capsys.readouterr().out
    assert f"task {task!r}: {metric} after is" in printed and "differs from the run" in printed
    assert f"task {data['tasks'][0]['task']!r}" not in printed  # only the altered row is named


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_quick_with_from_results_is_refused(capsys, path):
    with pytest.raises(SystemExit) as exit_:
        _load(path).main(["--quick", "--from_results", "x"])  # refused before it looks for x
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--quick" in err and "--from_results" in err and "no such results file" not in err


def test_a_recipe_without_quick_flags_refuses_quick_naming_its_script(capsys):
    with pytest.raises(SystemExit) as exit_:
        reproduce.reproduce_main("lm_online.run", ["--quick"], quick_flags=None)
    assert exit_.value.code == 2
    assert "--quick: reproduce/gpt_neo_lm_online.py has no quick run" in capsys.readouterr().err


CARDS = sorted(p.parent for p in (ROOT / "model_cards").glob("*/results.json"))
CARD_SCRIPT = {"cnn_retrain": "cnn_retrain_digits"}  # a card folder whose script is named otherwise


def test_the_committed_cards_are_there():
    assert {p.name for p in CARDS} >= {"clip_cls_online", "vit_cls_online", "gpt_neo_lm_online", "sam_seg_online",
                                       "cnn_retrain", "knob_ablation", "seed_memory_figure"}


@pytest.mark.parametrize("folder", CARDS, ids=lambda p: p.name)
def test_a_committed_card_agrees_with_its_results(tmp_path, capsys, folder):
    """Every number in model_cards/<card>/README.md is what its results.json says (checked on a copy: nothing in the
    checkout is written)."""
    script = ROOT / "reproduce" / f"{CARD_SCRIPT.get(folder.name, folder.name)}.py"
    assert script.exists(), f"model_cards/{folder.name}: no reproduce script {script.name}"
    for name in ("results.json", "README.md"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    status = _load(script).main(["--from_results", str(tmp_path / "results.json"),
                                 "--check", str(tmp_path / "README.md")])
    assert status == 0, capsys.readouterr().out
