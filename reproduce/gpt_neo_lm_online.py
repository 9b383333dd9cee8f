"""Regenerate the model card of recipes/gpt_neo_lm_online.py's offline default (a tiny GPT-Neo, stdlib code ->
its docstrings and comments -> package licences and descriptions; perplexity) and print its per-task table.

    python reproduce/gpt_neo_lm_online.py                                          # run the offline default, write its card
    python reproduce/gpt_neo_lm_online.py --from_results outputs/gpt_neo_lm_online/results.json   # regenerate from a run
    python reproduce/gpt_neo_lm_online.py --check outputs/gpt_neo_lm_online/README.md             # exit 1 if it differs

Flags this script does not know go to the recipe. The logic lives in online_recipe.model_card.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from online_recipe.model_card import reproduce_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(reproduce_main("lm_online.run", description=__doc__.split("\n\n")[0]))
