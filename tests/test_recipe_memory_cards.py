"""reproduce/knob_ablation.py and reproduce/seed_memory_figure.py end to end at --quick size: results.json and the
card agree, --check passes on the card it wrote (and on a fresh run), and a tampered card fails naming the row."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from mpopt_hf import MemoryConfig

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"reproduce_{name}", ROOT / "reproduce" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tamper(card: Path, row_start: str, column: int) -> None:
    """Add 1 MiB to one cell of the table row that starts with ``row_start``."""
    lines = card.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(row_start))
    cells = lines[i].split(" | ")
    cells[column] = f"{float(cells[column]) + 1:.1f}"
    lines[i] = " | ".join(cells)
    card.write_text("\n".join(lines) + "\n")


@pytest.mark.usefixtures("one_torch_thread")
def test_knob_ablation_quick_writes_a_card_its_check_accepts_and_a_tampered_one_fails(tmp_path, capsys):
    script = _script("knob_ablation")
    out = tmp_path / "ablation"
    assert script.main(["--quick", "--models", "vit", "--output_dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["row"]: r for r in results["models"][0]["rows"]}
    assert MemoryConfig.from_dict(rows["+ checkpointing"]["config"]) == MemoryConfig(1, 0.0, 4, "bf16")
    assert rows["baseline"]["x_memory"] == 1.0
    assert rows["+ freezing = all together"]["peak_mib"] < rows["baseline"]["peak_mib"]
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "model-index" in card and "--quick --models vit" in card
    measured = f"{rows['+ checkpointing']['peak_mib']:.1f}"
    assert re.search(rf"\| vit \| \+ checkpointing \| mb1/f0.00/ckpt4/bf16 \| [\d.]+ \| {re.escape(measured)} \|", card)

    capsys.readouterr()
    again = ["--from_results", str(out / "results.json"), "--check", str(out / "README.md")]
    assert script.main(again) == 0 and "agrees with" in capsys.readouterr().out
    # a fresh run measures the same memory (times differ and are not compared)
    assert script.main(["--quick", "--models", "vit", "--check", str(out / "README.md")]) == 0

    _tamper(out / "README.md", "| vit | + checkpointing |", 4)
    assert script.main(again) == 1
    printed = capsys.readouterr().out
    assert "row 'vit / + checkpointing': measured peak MiB is" in printed and "differs from" in printed


@pytest.mark.usefixtures("one_torch_thread")
def test_seed_memory_figure_quick_measures_default_and_minimum_and_checks_its_card(tmp_path, capsys):
    script = _script("seed_memory_figure")
    out = tmp_path / "figure"
    assert script.main(["--quick", "--models", "vit-b16", "--output_dir", str(out)]) == 0
    model = json.loads((out / "results.json").read_text())["models"][0]
    rows = {r["row"]: r for r in model["rows"]}
    assert MemoryConfig.from_dict(rows["default"]["config"]) == MemoryConfig(4)
    minimum = rows["minimum"]
    assert minimum["search"]["n_configs"] == 2 * 3 * sum(range(1, model["n_blocks"] + 2))  # fp32/bf16, 3 divisors of 4
    assert minimum["exact_mib"] <= min(s["exact_mib"] for s in minimum["search"]["shortlist"]) + 1e-3
    assert minimum["peak_mib"] < rows["default"]["peak_mib"] and minimum["x_default"] < 1.0
    assert rows["minimum, a block trains"]["peak_mib"] >= minimum["peak_mib"] - 0.1
    assert set(minimum["categories_mib"]) == {"weights", "gradients", "optimizer_state", "activations",
                                              "temporaries", "inputs"}

    capsys.readouterr()
    again = ["--from_results", str(out / "results.json"), "--check", str(out / "README.md")]
    assert script.main(again) == 0
    _tamper(out / "README.md", "| vit-b16 | minimum |", 6)  # the weights column
    assert script.main(again) == 1
    assert "row 'vit-b16 / minimum': weights is" in capsys.readouterr().out


def test_check_refuses_to_overwrite_the_card_it_checks(tmp_path):
    script = _script("knob_ablation")
    (tmp_path / "README.md").write_text("card")
    with pytest.raises(SystemExit):
        script.main(["--quick", "--output_dir", str(tmp_path), "--check", str(tmp_path / "README.md")])
