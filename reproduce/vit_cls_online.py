"""Regenerate the model card of recipes/vit_cls_online.py's offline default (a ~0.3 M ViT pre-trained on clean digits,
then 5 corruptions of them) and print its per-task table.

    python reproduce/vit_cls_online.py                                       # run the offline default, write its card
    python reproduce/vit_cls_online.py --quick                               # a 2-layer ViT, 2 short tasks (CI size)
    python reproduce/vit_cls_online.py --from_results model_cards/vit_cls_online/results.json   # regenerate from a run
    python reproduce/vit_cls_online.py --check model_cards/vit_cls_online/README.md   # exit 1 if it differs

--quick runs the recipe small (its flags: vit_online.run.QUICK_FLAGS; the card goes to
outputs/vit_cls_online_quick/). Flags this script does not know go to the recipe, after --quick's, so they override
them. The logic lives in online_recipe.reproduce.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from online_recipe.reproduce import reproduce_main  # noqa: E402
from vit_online.run import QUICK_FLAGS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The script's exit status for ``argv`` (None: the command line); what tests call in-process."""
    return reproduce_main("vit_online.run", argv, description=__doc__.split("\n\n")[0], quick_flags=QUICK_FLAGS)


if __name__ == "__main__":
    sys.exit(main())
