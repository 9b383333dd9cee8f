"""The pruning rules, in order (`RULES`): what ran out of memory (or over the budget) is out; BatchNorm models never
train on tiny micro-batches; a configuration must fit the budget (*feasibility*); among those with the same
trainable set and precision only the fastest is worth a trial (*dominance*). Each rule is a pure filter
``(candidates, context) -> candidates`` on `Candidate` lists, so each is tested on numbers alone. An
out-of-memory error marks everything predicted at least as large (`at_least_as_large`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..config import MIB, MemoryConfig
from ..space import fits, min_fitting_budget, usable_bytes
from .candidates import Candidate


@dataclass(frozen=True)
class PruneContext:
    """What the rules judge candidates against: the budget, its margin, and what the model is."""

    budget_bytes: float | None
    margin: float
    has_batchnorm: bool = False
    bn_min_micro_batch: int = 8
    effective_batch: int | None = None
    infeasible: frozenset[MemoryConfig] = frozenset()  # marked: ran out of memory, measured over the budget


def feasible(candidates: Iterable[Candidate], budget_bytes: float | None, margin: float) -> list[Candidate]:
    """Predicted peak <= budget x (1 - margin). Without a budget or a prediction, a candidate is kept."""
    return [c for c in candidates if fits(c.peak_bytes, budget_bytes, margin)]


def group_key(config: MemoryConfig) -> tuple[float, str, int | None, str, int]:
    """What a configuration learns: its trainable set, precision, batch per update, optimizer state (8-bit
    moments round what AdamW keeps, as bf16 rounds the forward) and LoRA rank; micro-batching and checkpointing
    change only what it costs."""
    return (config.freeze_rate, config.precision, config.batch_size, config.optimizer_state, config.lora_rank)


def _speed_key(c: Candidate) -> tuple[float, int, int]:
    """Fastest first: predicted step time when known, then largest micro-batch, then fewest segments."""
    return (c.step_s if c.step_s is not None else 0.0, -c.config.micro_batch_size, c.config.checkpoint_segments)


def dominance_prune(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Keep, per (freeze_rate, precision, batch per update, optimizer state, LoRA rank), only the fastest candidate.

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


def known_infeasible_rule(candidates: Sequence[Candidate], ctx: PruneContext) -> list[Candidate]:
    """Drop what is marked infeasible; raises ValueError when every candidate is."""
    allowed = [c for c in candidates if c.config not in ctx.infeasible]
    if not allowed:
        raise ValueError(f"Every configuration ({len(candidates)}) is marked infeasible: each ran out of memory, or "
                         "is predicted at least as large as one that did, or measured over the budget.")
    return allowed


def batchnorm_rule(candidates: Sequence[Candidate], ctx: PruneContext) -> list[Candidate]:
    """`batchnorm_filter` for BatchNorm models; raises ValueError when it leaves nothing."""
    if not ctx.has_batchnorm:
        return list(candidates)
    allowed = batchnorm_filter(candidates, ctx.bn_min_micro_batch, ctx.effective_batch)
    if not allowed:
        raise ValueError(
            f"No configuration is allowed: the model has BatchNorm and every micro-batch is below "
            f"bn_min_micro_batch={ctx.bn_min_micro_batch}; add larger micro_batch_sizes or lower bn_min_micro_batch."
        )
    return allowed


def feasibility_rule(candidates: Sequence[Candidate], ctx: PruneContext) -> list[Candidate]:
    """`feasible`; raises ValueError when nothing fits, naming the minimum and the budget it needs."""
    fitting = feasible(candidates, ctx.budget_bytes, ctx.margin)
    if not fitting:
        smallest = min(candidates, key=lambda c: c.peak_bytes)  # all predicted, else they would fit
        raise ValueError(
            f"MPOptArguments.memory_budget_mib={ctx.budget_bytes / MIB:.1f} (usable "
            f"{usable_bytes(ctx.budget_bytes, ctx.margin) / MIB:.1f} MiB after a margin of {ctx.margin:.3g}: "
            f"safety_margin, or the cost model's uncertainty when larger) is below the minimum feasible peak "
            f"{smallest.peak_bytes / MIB:.1f} MiB, reached by {smallest.config.short()}; raise memory_budget_mib to "
            f"at least {min_fitting_budget(smallest.peak_bytes, ctx.margin) / MIB:.1f} or widen the search space."
        )
    return fitting


def dominance_rule(candidates: Sequence[Candidate], ctx: PruneContext) -> list[Candidate]:
    """`dominance_prune`: the fastest of each trainable set, fastest first."""
    return dominance_prune(candidates)


Rule = Callable[[Sequence[Candidate], PruneContext], list[Candidate]]
RULES: tuple[Rule, ...] = (known_infeasible_rule, batchnorm_rule, feasibility_rule, dominance_rule)


def prune(
    candidates: Sequence[Candidate],
    budget_bytes: float | None,
    margin: float,
    *,
    has_batchnorm: bool = False,
    bn_min_micro_batch: int = 8,
    effective_batch: int | None = None,
    infeasible: Iterable[MemoryConfig] = (),
) -> list[Candidate]:
    """The `RULES` in order. Raises ValueError when a rule leaves nothing (e.g. nothing fits, naming the minimum)."""
    if not candidates:
        raise ValueError("No candidate configuration to prune: the search space is empty.")
    ctx = PruneContext(budget_bytes, margin, has_batchnorm, bn_min_micro_batch, effective_batch, frozenset(infeasible))
    survivors = list(candidates)
    for rule in RULES:
        survivors = rule(survivors, ctx)
    return survivors


def at_least_as_large(c: Candidate, failed: Candidate) -> bool:
    """Whether ``c`` needs at least the memory of ``failed``, which ran out of it: by the predicted peaks when
    both are known, else when it has the same knobs but as large a micro-batch and no more checkpoint segments."""
    if failed.peak_bytes is not None and c.peak_bytes is not None:
        return c.peak_bytes >= failed.peak_bytes
    config = failed.config
    # fewer checkpointed blocks keep more; a selective block keeps more than a whole-block one
    keeps_as_much = c.config.checkpoint_segments <= config.checkpoint_segments and (
        not c.config.checkpoint_segments or c.config.selective or not config.selective)
    # fp32 moments hold more than 8-bit ones; full training more than any LoRA rank, a higher rank more than a lower
    same_learning = group_key(c.config)[:3] == group_key(config)[:3] and (
        c.config.optimizer_state == config.optimizer_state or c.config.optimizer_state == "fp32") and (
        c.config.lora_rank == 0 or 0 < config.lora_rank <= c.config.lora_rank)
    return same_learning and c.config.micro_batch_size >= config.micro_batch_size and keeps_as_much
