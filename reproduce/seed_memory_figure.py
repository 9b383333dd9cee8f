"""The seed's memory figure as a model card: each model's default peak and the smallest peak of the whole knob
space (found with the fake-tensor memory model, then measured), their ratio beside the seed's x0.04 / x0.05 / x0.04,
and what the minimum is made of.

    python reproduce/seed_memory_figure.py                       # resnet50-cifar, mobilenetv2-cifar (batch 128), clip-b32 (32)
    python reproduce/seed_memory_figure.py --quick               # their tiny variants, batch 4 (CI size)
    python reproduce/seed_memory_figure.py --models clip-b32 --batch_size 16
    python reproduce/seed_memory_figure.py --from_results model_cards/seed_memory_figure/results.json --check model_cards/seed_memory_figure/README.md

The logic lives in memory_cards.memory_figure.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from memory_cards.cli import main as card_main  # noqa: E402
from memory_cards.memory_figure import script  # noqa: E402


def main(argv=None) -> int:
    return card_main(script(), argv)


if __name__ == "__main__":
    sys.exit(main())
