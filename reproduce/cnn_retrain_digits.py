"""Regenerate the model card of recipes/cnn_retrain.py's offline default (resnet18 x0.25, digits -> mnist-m, svhn,
usps) and print its per-task table.

    python reproduce/cnn_retrain_digits.py                                     # run the offline default, write its card
    python reproduce/cnn_retrain_digits.py --from_results outputs/cnn_retrain/results.json   # regenerate from a run
    python reproduce/cnn_retrain_digits.py --check outputs/cnn_retrain/README.md             # exit 1 if it differs

Flags this script does not know go to the recipe. The logic lives in online_recipe.model_card.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from online_recipe.model_card import reproduce_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(reproduce_main("cnn_online.run", description=__doc__.split("\n\n")[0]))
