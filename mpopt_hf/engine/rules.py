"""The pruning rules, in order: a configuration must fit the budget (*feasibility*); BatchNorm models never
train on tiny micro-batches; among those with the same trainable set and precision only the fastest is worth a
trial (*dominance*); an out-of-memory error removes everything predicted at least as large. Pure functions on
`Candidate` lists, so each rule is tested on numbers alone."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..config import MIB, MemoryConfig
from .candidates import Candidate


def usable_bytes(budget_bytes: float | None, margin: float) -> float | None:
    """The budget less its safety margin (None: no budget)."""
    return None if budget_bytes is None else budget_bytes * (1.0 - margin)


def feasible(candidates: Iterable[Candidate], budget_bytes: float | None, margin: float) -> list[Candidate]:
    """Predicted peak <= budget x (1 - margin). Without a budget or a prediction, a candidate is kept."""
    limit = usable_bytes(budget_bytes, margin)
    return [c for c in candidates if limit is None or c.peak_bytes is None or c.peak_bytes <= limit]


def group_key(config: MemoryConfig) -> tuple[float, str, int | None, str]:
    """What a configuration learns: its trainable set, precision, batch per update and optimizer state (8-bit
    moments round what AdamW keeps, as bf16 rounds the forward); micro-batching and checkpointing change only
    what it costs."""
    return (config.freeze_rate, config.precision, config.batch_size, config.optimizer_state)


def _speed_key(c: Candidate) -> tuple[float, int, int]:
    """Fastest first: predicted step time when known, then largest micro-batch, then fewest segments."""
    return (c.step_s if c.step_s is not None else 0.0, -c.config.micro_batch_size, c.config.checkpoint_segments)


def dominance_prune(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Keep, per (freeze_rate, precision, batch per update, optimizer state), only the fastest candidate.

    Micro-batch size and checkpointing change cost, not what is learned (same gradient for the same effective
    batch), so within one trainable set and precision a slower candidate can never gain more per second.
    """
    best: dict[tuple[float, str, int | None, str], Candidate] = {}
    for c in candidates:
        group = group_key(c.config)
        if group not in best or _speed_key(c) < _speed_key(best[group]):
            best[group] = c
    return sorted(best.values(), key=_speed_key)


def batchnorm_filter(candidates: Iterable[Candidate], min_micro_batch: int, effective_batch: int | None) -> list[Candidate]:
    """Drop micro-batches below ``min_micro_batch`` for BatchNorm models.

    BatchNorm normalises each micro-batch with its own statistics and updates its running statistics from
    it; with a handful of samples both are noise, so the gradient is no longer the big batch's. A micro-batch
    as large as the whole effective batch is always allowed (that is the run's own batch).
    """
    return [
        c
        for c in candidates
        if c.config.micro_batch_size >= min_micro_batch
        or c.config.micro_batch_size >= (c.config.batch_size or effective_batch or min_micro_batch)
    ]


def prune(
    candidates: Sequence[Candidate],
    budget_bytes: float | None,
    margin: float,
    *,
    has_batchnorm: bool = False,
    bn_min_micro_batch: int = 8,
    effective_batch: int | None = None,
) -> list[Candidate]:
    """Feasibility, then BatchNorm, then dominance. Raises ValueError when nothing fits, naming the minimum."""
    allowed = batchnorm_filter(candidates, bn_min_micro_batch, effective_batch) if has_batchnorm else list(candidates)
    if not allowed:
        raise ValueError(
            f"No configuration is allowed: the model has BatchNorm and every micro-batch is below "
            f"bn_min_micro_batch={bn_min_micro_batch}; add larger micro_batch_sizes or lower bn_min_micro_batch."
        )
    fitting = feasible(allowed, budget_bytes, margin)
    if not fitting:
        smallest = min(allowed, key=lambda c: c.peak_bytes)  # all predicted, else they would fit
        raise ValueError(
            f"MPOptArguments.memory_budget_mib={budget_bytes / MIB:.1f} (usable {usable_bytes(budget_bytes, margin) / MIB:.1f} "
            f"MiB after a margin of {margin:.3g}: safety_margin, or the cost model's uncertainty when larger) is below the minimum feasible peak {smallest.peak_bytes / MIB:.1f} MiB, "
            f"reached by {smallest.config.short()}; raise memory_budget_mib to at least "
            f"{smallest.peak_bytes / (1 - margin) / MIB:.1f} or widen the search space."
        )
    return dominance_prune(fitting)


def at_least_as_large(c: Candidate, failed: Candidate) -> bool:
    """Whether ``c`` needs at least the memory of ``failed``, which ran out of it: by the predicted peaks when
    both are known, else when it has the same knobs but as large a micro-batch and no more checkpoint segments."""
    if failed.peak_bytes is not None and c.peak_bytes is not None:
        return c.peak_bytes >= failed.peak_bytes
    config = failed.config
    # fewer checkpointed blocks keep more; a selective block keeps more than a whole-block one
    keeps_as_much = c.config.checkpoint_segments <= config.checkpoint_segments and (
        not c.config.checkpoint_segments or c.config.selective or not config.selective)
    # fp32 moments hold more than 8-bit ones
    same_learning = group_key(c.config)[:3] == group_key(config)[:3] and (
        c.config.optimizer_state == config.optimizer_state or c.config.optimizer_state == "fp32")
    return same_learning and c.config.micro_batch_size >= config.micro_batch_size and keeps_as_much
