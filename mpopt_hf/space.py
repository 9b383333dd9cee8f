"""The search space, once for every caller (the engine, the online loop, `mpopt profile`, the benchmarks): every
valid combination of the knobs, the default values of each knob, and what "fits" means: the predicted peak is at
most the budget less its safety margin. Torch-free, like the engine that reads it."""

from __future__ import annotations

from collections.abc import Iterable

from .config import MemoryConfig
from .model.plan import n_frozen_blocks


def usable_bytes(budget_bytes: float | None, margin: float) -> float | None:
    """The budget less its safety margin (None: no budget)."""
    return None if budget_bytes is None else budget_bytes * (1.0 - margin)


def fits(peak_bytes: float | None, budget_bytes: float | None, margin: float) -> bool:
    """Whether a predicted peak fits the budget less its margin; without a budget or a prediction, it does."""
    limit = usable_bytes(budget_bytes, margin)
    return limit is None or peak_bytes is None or peak_bytes <= limit


def min_fitting_budget(peak_bytes: float, margin: float) -> float:
    """The smallest budget that ``peak_bytes`` fits once the margin is taken off."""
    return peak_bytes / (1.0 - margin)


def enumerate_configs(
    micro_batch_sizes: Iterable[int],
    freeze_rates: Iterable[float],
    checkpoint_segments: Iterable[int],
    precisions: Iterable[str],
    n_blocks: int,
    batch_sizes: Iterable[int | None] = (None,),
    checkpoint_policies: Iterable[str] = ("block",),
    optimizer_states: Iterable[str] = ("fp32",),
    lora_ranks: Iterable[int] = (0,),
) -> list[MemoryConfig]:
    """Every combination that is valid for a model with ``n_blocks`` blocks (segments <= trainable blocks).

    ``batch_sizes``: the batches per update (None: the loader's); under a batch ``b`` a micro-batch above ``b``
    would run as ``b``, so it is listed as ``b``, once. ``checkpoint_policies`` apply to segment counts above 0
    (without checkpointing the policy is moot: that configuration is listed once, as 'block'); every configuration
    is listed once per ``optimizer_states`` and once per ``lora_ranks`` (0: no adapters; a rank
    above 0 only where some block trains, to carry the adapters)."""
    policies, states = list(dict.fromkeys(checkpoint_policies)), list(dict.fromkeys(optimizer_states))
    ranks = list(dict.fromkeys(lora_ranks))
    configs = []
    for batch in batch_sizes:
        micro = sorted({m if batch is None else min(m, batch) for m in micro_batch_sizes}, reverse=True)
        for precision in precisions:
            for rate in sorted({float(r) for r in freeze_rates}):
                trainable = n_blocks - n_frozen_blocks(rate, n_blocks)
                for segments in sorted(set(checkpoint_segments)):
                    if segments > trainable:
                        continue
                    for policy in policies if segments else ["block"]:
                        for state in states:
                            configs.extend(MemoryConfig(mb, freeze_rate=rate, checkpoint_segments=segments,
                                                        precision=precision, batch_size=batch,
                                                        checkpoint_policy=policy, optimizer_state=state,
                                                        lora_rank=rank)
                                           for rank in ranks if trainable or not rank for mb in micro)
    return configs


def default_micro_batch_sizes(effective_batch: int) -> list[int]:
    """Powers of two below the effective batch, and the effective batch itself."""
    sizes = {effective_batch}
    size = 1
    while size < effective_batch:
        sizes.add(size)
        size *= 2
    return sorted(sizes, reverse=True)


def default_freeze_rates(n_blocks: int) -> list[float]:
    """0, 1/4, 1/2, 3/4, keeping only rates that freeze a distinct number of blocks."""
    rates, seen = [], set()
    for rate in (0.0, 0.25, 0.5, 0.75):
        frozen = n_frozen_blocks(rate, n_blocks)
        if frozen not in seen and frozen < n_blocks:
            seen.add(frozen)
            rates.append(rate)
    return rates


def default_checkpoint_segments(n_blocks: int) -> list[int]:
    """Off, half the blocks, all blocks (the per-freeze-rate cap is applied by `enumerate_configs`)."""
    return sorted({0, max(1, n_blocks // 2), n_blocks})
