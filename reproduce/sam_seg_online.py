"""Regenerate the model card of recipes/sam_seg_online.py's offline default (a tiny SAM pre-trained on generated
shapes, then 4 corruptions of them, scored by mIoU) and print its per-task table.

    python reproduce/sam_seg_online.py                                         # run the offline default, write its card
    python reproduce/sam_seg_online.py --from_results outputs/sam_seg_online/results.json   # regenerate from a run
    python reproduce/sam_seg_online.py --check outputs/sam_seg_online/README.md             # exit 1 if it differs

Flags this script does not know go to the recipe. The logic lives in online_recipe.model_card.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from online_recipe.model_card import reproduce_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(reproduce_main("sam_online.run", description=__doc__.split("\n\n")[0]))
