"""The configuration space of the knob grid, and the check that some configuration of it fits a budget."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..config import MIB, MemoryConfig
from ..space import enumerate_configs, fits, min_fitting_budget
from .model import MemoryModel, Prediction


class BudgetTooSmallError(ValueError):
    """No configuration of the space fits the memory budget."""

    def __init__(self, budget_mib: float, min_peak_mib: float, config: MemoryConfig, margin: float = 0.0) -> None:
        self.budget_mib, self.min_peak_mib, self.config = budget_mib, min_peak_mib, config
        kept = f" less its safety margin of {margin:.3g}" if margin else ""
        super().__init__(
            f"A memory budget of {budget_mib:.1f} MiB{kept} is below the smallest predicted peak of this "
            f"configuration space, {min_peak_mib:.1f} MiB (reached by {config.short()}); raise the budget to at least "
            f"{math.ceil(min_fitting_budget(min_peak_mib, margin))} MiB or shrink the model/batch."
        )


def _powers_of_two_upto(n: int) -> list[int]:
    out, v = [], 1
    while v < n:
        out.append(v)
        v *= 2
    return out + [n]


def config_space(
    batch_size: int,
    n_blocks: int,
    precisions: Sequence[str] = ("fp32", "bf16"),
    micro_batch_sizes: Sequence[int] | None = None,
    freeze_rates: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    checkpoint_segments: Sequence[int] = (0, 1, 2, 4),
    checkpoint_policies: Sequence[str] = ("block",),
    optimizer_states: Sequence[str] = ("fp32",),
    lora_ranks: Sequence[int] = (0,),
) -> list[MemoryConfig]:
    """Every valid configuration of the knob grid that `mpopt profile` shows, as `space.enumerate_configs` lists
    it (segments above the trainable block count are skipped; the policies apply to segment counts above 0), in
    the table's order: precision, freeze rate, segments, policy, optimizer state, LoRA rank, micro-batch. Its
    defaults are wider than the engine's search (`space.default_*`): a profile also shows head-only training."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    sizes = sorted(set(micro_batch_sizes or _powers_of_two_upto(batch_size)))
    bad = [s for s in sizes if not 1 <= s <= batch_size]
    if bad:
        raise ValueError(f"micro_batch_sizes {bad} are outside 1..{batch_size} (the effective batch).")
    configs = enumerate_configs(sizes, freeze_rates, checkpoint_segments, precisions, n_blocks,
                                checkpoint_policies=checkpoint_policies, optimizer_states=optimizer_states,
                                lora_ranks=lora_ranks)
    order = {name: i for i, name in enumerate(dict.fromkeys([*precisions, *checkpoint_policies, *optimizer_states]))}
    return sorted(configs, key=lambda c: (order[c.precision], c.freeze_rate, c.checkpoint_segments,
                                          order[c.checkpoint_policy], order[c.optimizer_state], c.lora_rank,
                                          c.micro_batch_size))


def min_peak(model: MemoryModel, space: Iterable[MemoryConfig], batch_size: int) -> Prediction:
    """The configuration with the smallest predicted peak."""
    predictions = [model.predict(cfg, batch_size) for cfg in space]
    if not predictions:
        raise ValueError("The configuration space is empty.")
    return min(predictions, key=lambda p: p.peak_bytes)


def check_budget(model: MemoryModel, space: Iterable[MemoryConfig], batch_size: int, budget_mib: float,
                 margin: float = 0.0) -> Prediction:
    """Raise `BudgetTooSmallError` (naming the minimum and its configuration) if nothing fits the budget less its
    ``margin`` (`space.fits`, the engine's rule)."""
    if not budget_mib > 0:
        raise ValueError(f"The memory budget must be a positive number of MiB, got {budget_mib}.")
    best = min_peak(model, space, batch_size)
    if not fits(best.peak_bytes, budget_mib * MIB, margin):
        raise BudgetTooSmallError(budget_mib, best.peak_mib, best.config, margin)
    return best
