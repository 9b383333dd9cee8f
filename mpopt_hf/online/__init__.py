"""Retraining over a stream of tasks (`loop`: `OnlineRetrainer` and its baselines), its records and summary
(`records`, readable without the trainer), the step timeline (`timeline`) and accuracy on a task (`evaluation`)."""

from __future__ import annotations

from ..lazy_exports import lazy_getattr

_LOOP, _RECORDS = f"{__name__}.loop", f"{__name__}.records"
__all__ = ["BASELINES", "OnlineRetrainer", "OnlineResult", "TaskRecord", "accuracy_on", "summarise"]
__getattr__ = lazy_getattr(__name__, {
    "BASELINES": _LOOP, "OnlineRetrainer": _LOOP, "OnlineResult": _RECORDS, "TaskRecord": _RECORDS,
    "summarise": _RECORDS, "accuracy_on": f"{__name__}.evaluation",
})
