"""Regenerate the model card of recipes/vit_cls_online.py's offline default (a ~0.3 M ViT pre-trained on clean
digits, then 5 corruptions of them) and print its per-task table.

    python reproduce/vit_cls_online.py                                         # run the offline default, write its card
    python reproduce/vit_cls_online.py --quick                                 # a 2-layer ViT, 2 short tasks (CI size)
    python reproduce/vit_cls_online.py --from_results outputs/vit_cls_online/results.json   # regenerate from a run
    python reproduce/vit_cls_online.py --check outputs/vit_cls_online/README.md             # exit 1 if it differs

Flags this script does not know go to the recipe (after --quick's, so they override them). The logic lives in
online_recipe.model_card.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from online_recipe.model_card import reproduce_main  # noqa: E402
from vit_online.run import QUICK_FLAGS  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv:
        if any(a.split("=", 1)[0] == "--from_results" for a in argv):
            sys.exit("--quick runs the recipe small; --from_results reads a finished run: give one.")
        argv = [*QUICK_FLAGS, *(a for a in argv if a != "--quick")]
    return reproduce_main("vit_online.run", argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
