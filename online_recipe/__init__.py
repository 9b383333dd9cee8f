"""What the online-retraining recipes share: the run's arguments (baselines, budget), parsing with the recipe's
defaults first, the default budget, supervised source pre-training with a cache, and the stream's run and report.

``clip_online.run`` (``recipes/clip_cls_online.py``) and ``cnn_online.run`` (``recipes/cnn_retrain.py``) build
their model and stream, then hand them to :func:`run_and_report`, which also writes the run's model card
(:mod:`online_recipe.model_card`, README.md next to results.json); ``reproduce/*.py`` regenerate and check it.
"""

from __future__ import annotations

from .common import (
    QUIET_TRAINER_FLAGS,
    SMALL_SPACE_FLAGS,
    RunArguments,
    at_most,
    cached_model,
    default_budget_mib,
    given_flags,
    parse_args,
    resolve_budget,
    run_and_report,
    supervised_pretrain,
)
from .model_card import build_card, check_card, render_table, write_card

__all__ = [
    "QUIET_TRAINER_FLAGS",
    "SMALL_SPACE_FLAGS",
    "RunArguments",
    "at_most",
    "build_card",
    "cached_model",
    "check_card",
    "default_budget_mib",
    "given_flags",
    "parse_args",
    "render_table",
    "resolve_budget",
    "run_and_report",
    "supervised_pretrain",
    "write_card",
]
