"""What the online-retraining recipes share: the run's arguments (baselines, budget), parsing with the recipe's
defaults first, the default budget, supervised source pre-training with a cache, and the stream's run and report.

``clip_online.run`` (``recipes/clip_cls_online.py``) and ``cnn_online.run`` (``recipes/cnn_retrain.py``) build
their model and stream, then hand them to :func:`run_and_report`.
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

__all__ = [
    "QUIET_TRAINER_FLAGS",
    "SMALL_SPACE_FLAGS",
    "RunArguments",
    "at_most",
    "cached_model",
    "default_budget_mib",
    "given_flags",
    "parse_args",
    "resolve_budget",
    "run_and_report",
    "supervised_pretrain",
]
