"""The knob-ablation model card: each memory knob added one by one (baseline, + micro-batching, + bf16,
+ checkpointing, + freezing = all together) and each alone, measured peak beside predicted, step-time ratios.

    python reproduce/knob_ablation.py                                   # the zoo (full width) + tiny HF families
    python reproduce/knob_ablation.py --quick                           # tiny models, batch 4, 1 step (CI size)
    python reproduce/knob_ablation.py --models resnet50 clip-b32 --batch_size 16
    python reproduce/knob_ablation.py --from_results model_cards/knob_ablation/results.json   # re-render the card
    python reproduce/knob_ablation.py --from_results model_cards/knob_ablation/results.json --check model_cards/knob_ablation/README.md

The logic lives in memory_cards.ablation.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from memory_cards.ablation import script  # noqa: E402
from memory_cards.cli import main as card_main  # noqa: E402


def main(argv=None) -> int:
    return card_main(script(), argv)


if __name__ == "__main__":
    sys.exit(main())
