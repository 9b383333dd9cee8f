"""Regenerate the model card of recipes/sam_seg_online.py's offline default (a tiny SAM pre-trained on generated
shapes, then 4 corruptions of them, scored by mIoU) and print its per-task table.

    python reproduce/sam_seg_online.py                                       # run the offline default, write its card
    python reproduce/sam_seg_online.py --quick                               # the tiny SAM at 32 px, 2 tasks (CI size)
    python reproduce/sam_seg_online.py --from_results model_cards/sam_seg_online/results.json   # regenerate from a run
    python reproduce/sam_seg_online.py --check model_cards/sam_seg_online/README.md   # exit 1 if it differs

--quick runs the recipe small (its flags: sam_online.run.QUICK_FLAGS; the card goes to
outputs/sam_seg_online_quick/). Flags this script does not know go to the recipe, after --quick's, so they override
them. The logic lives in online_recipe.reproduce.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from online_recipe.reproduce import reproduce_main  # noqa: E402
from sam_online.run import QUICK_FLAGS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The script's exit status for ``argv`` (None: the command line); what tests call in-process."""
    return reproduce_main("sam_online.run", argv, description=__doc__.split("\n\n")[0], quick_flags=QUICK_FLAGS)


if __name__ == "__main__":
    sys.exit(main())
