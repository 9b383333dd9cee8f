"""Regenerate the model card of recipes/gpt_neo_lm_online.py's offline default (a tiny GPT-Neo, stdlib code -> its
docstrings and comments -> package licences and descriptions; perplexity) and print its per-task table.

    python reproduce/gpt_neo_lm_online.py                                    # run the offline default, write its card
    python reproduce/gpt_neo_lm_online.py --quick                            # 2-layer GPT-Neo, 2 short tasks (CI size)
    python reproduce/gpt_neo_lm_online.py --from_results model_cards/gpt_neo_lm_online/results.json   # regenerate from a run
    python reproduce/gpt_neo_lm_online.py --check model_cards/gpt_neo_lm_online/README.md   # exit 1 if it differs

--quick runs the recipe small (its flags: lm_online.run.QUICK_FLAGS; the card goes to
outputs/gpt_neo_lm_online_quick/). Flags this script does not know go to the recipe, after --quick's, so they
override them. The logic lives in online_recipe.reproduce.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from lm_online.run import QUICK_FLAGS  # noqa: E402
from online_recipe.reproduce import reproduce_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The script's exit status for ``argv`` (None: the command line); what tests call in-process."""
    return reproduce_main("lm_online.run", argv, description=__doc__.split("\n\n")[0], quick_flags=QUICK_FLAGS)


if __name__ == "__main__":
    sys.exit(main())
