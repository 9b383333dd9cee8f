"""Peak memory and step time of each knob, cumulatively and alone: the old bench command, now a thin forwarder.

The measurement and its model card live in `memory_cards.ablation`; the command to use is
``python reproduce/knob_ablation.py`` (see its --help). This script keeps the old flags working:

    python bench/knob_ablation.py --models resnet18 vit --batch-size 32 --steps 3

runs ``reproduce/knob_ablation.py --models resnet18 vit --batch_size 32 --steps 3`` (the card and results.json go to
model_cards/knob_ablation unless --output_dir says otherwise).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

RENAMED = {"--batch-size": "--batch_size"}


def main(argv: list[str] | None = None) -> int:
    from memory_cards.ablation import script
    from memory_cards.cli import main as card_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return card_main(script(), [_renamed(a) for a in argv])


def _renamed(arg: str) -> str:
    name, eq, value = arg.partition("=")
    return RENAMED.get(name, name) + eq + value


if __name__ == "__main__":
    sys.exit(main())
