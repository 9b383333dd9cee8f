"""What the online-retraining recipes share: the run's arguments (baselines, budget), parsing with the recipe's
defaults first, the default budget, supervised source pre-training with a cache, and the stream's run and report.

``clip_online.run`` (``recipes/clip_cls_online.py``), ``cnn_online.run`` (``recipes/cnn_retrain.py``) and
``lm_online.run`` (``recipes/gpt_neo_lm_online.py``) parse with :func:`parse_args` (the dataclasses and the run's
`Provenance`), build their model and stream, then hand them and the provenance to :func:`run_and_report`, which
also writes the run's model card (:mod:`online_recipe.model_card`, README.md next to results.json);
``reproduce/*.py`` regenerate and check it.
"""

from __future__ import annotations

from .common import (
    HUB_ID,
    QUIET_TRAINER_FLAGS,
    SMALL_SPACE_FLAGS,
    ParsedArgs,
    Provenance,
    RunArguments,
    at_most,
    cached_model,
    check_model_path,
    default_budget_mib,
    given_flags,
    parse_args,
    resolve_budget,
    run_and_report,
    supervised_pretrain,
)
from .model_card import build_card, check_card, render_table, write_card

__all__ = [
    "HUB_ID",
    "QUIET_TRAINER_FLAGS",
    "SMALL_SPACE_FLAGS",
    "ParsedArgs",
    "Provenance",
    "RunArguments",
    "at_most",
    "build_card",
    "cached_model",
    "check_model_path",
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
