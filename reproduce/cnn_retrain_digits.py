"""Regenerate the model card of recipes/cnn_retrain.py's offline default (resnet18 x0.25, digits -> mnist-m, svhn,
usps) and print its per-task table.

    python reproduce/cnn_retrain_digits.py                                   # run the offline default, write its card
    python reproduce/cnn_retrain_digits.py --quick                           # resnet18 x0.125, 2 tasks (CI size)
    python reproduce/cnn_retrain_digits.py --from_results model_cards/cnn_retrain/results.json   # regenerate from a run
    python reproduce/cnn_retrain_digits.py --check model_cards/cnn_retrain/README.md   # exit 1 if it differs

--quick runs the recipe small (its flags: cnn_online.run.QUICK_FLAGS; the card goes to outputs/cnn_retrain_quick/).
Flags this script does not know go to the recipe, after --quick's, so they override them. The logic lives in
online_recipe.reproduce.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from cnn_online.run import QUICK_FLAGS  # noqa: E402
from online_recipe.reproduce import reproduce_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The script's exit status for ``argv`` (None: the command line); what tests call in-process."""
    return reproduce_main("cnn_online.run", argv, description=__doc__.split("\n\n")[0], quick_flags=QUICK_FLAGS)


if __name__ == "__main__":
    sys.exit(main())
