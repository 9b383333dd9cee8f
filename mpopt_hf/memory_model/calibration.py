"""What measurements add to the traced bytes (workspaces, allocator) and the time model's rates, fitted."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..config import MemoryConfig
from .least_squares import nonneg_least_squares

if TYPE_CHECKING:  # for the annotation only: the model imports this module, not the other way round
    from .model import MemoryModel


@dataclass(frozen=True)
class Calibration:
    """What measurements add to the traced tensor bytes: kernel workspaces and allocator effects, as a
    constant plus bytes per sample of the micro-batch, per precision (kernels differ); a precision
    nobody measured takes the mean of the others."""

    const_bytes: float = 0.0
    per_sample_bytes: dict[str, float] = field(default_factory=dict)
    op_s: float = 2e-5
    flop_s: dict[str, float] = field(default_factory=dict)
    opt_tensor_s: float = 0.0
    n_memory_points: int = 0
    n_time_points: int = 0
    # the largest share of a measured peak the fit under-predicted when that measurement was left out of it
    # (leave-one-out): what the engine's margin must cover for a chosen configuration to stay in its budget
    uncertainty: float = 0.0
    # a precision measured at one micro-batch only: (m, workspace bytes there, the slope of the precisions
    # measured at several); kernels of another precision may add a larger constant (bf16 weight reorders),
    # which one point cannot tell from a steeper rate, so the prediction takes the higher of the two readings
    single_point: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def workspace(self, precision: str, micro_batch: float) -> float:
        rates = self.per_sample_bytes
        rate = rates.get(precision, statistics.mean(rates.values()) if rates else 0.0)
        bytes_ = self.const_bytes + rate * micro_batch
        if precision in self.single_point:  # one reading cannot split a constant from a rate: take the higher
            m0, r0, slope = self.single_point[precision]
            bytes_ = max(bytes_, r0 + slope * (micro_batch - m0))
        return bytes_


def fit_calibration(model: MemoryModel, measured: Sequence[tuple[MemoryConfig, int, float, float | None]]) -> Calibration:
    """Workspace bytes (``const + per_sample[precision] * micro_batch``, non-negative) and time coefficients.

    Memory: the residual of each measurement against the traced prediction. Time: ``op_s * ops +
    flop_s[precision] * flops + opt_tensor_s * tensors`` fitted to the measured step times.
    """
    bare = replace(model, calibration=Calibration())
    points = [(cfg.precision, float(min(cfg.micro_batch_size, batch)), peak, bare.predict(cfg, batch).peak_bytes)
              for cfg, batch, peak, _ in measured]
    const, per_sample, single = _workspace_fit([(p, m, peak - traced) for p, m, peak, traced in points])
    uncertainty = 0.0
    for i, (precision, m, peak, traced) in enumerate(points):
        others = [(p, m2, pk - tr) for j, (p, m2, pk, tr) in enumerate(points) if j != i]
        held_const, held_rates, held_single = _workspace_fit(others)
        held_out = Calibration(held_const, held_rates, single_point=held_single)
        uncertainty = max(uncertainty, 1.0 - (traced + held_out.workspace(precision, m)) / peak)

    timed = [(cfg, batch, t) for cfg, batch, _, t in measured if t]
    op_s, flop_s, opt_s = Calibration.op_s, {}, 0.0
    if timed:
        t_precisions = sorted({cfg.precision for cfg, *_ in timed})
        rows, targets = [], []
        for cfg, batch, t in timed:
            ops, flops, _ = bare.work(cfg, batch)
            rows.append([ops] + [flops if cfg.precision == p else 0.0 for p in t_precisions])
            targets.append(t)
        coef = nonneg_least_squares(rows, targets)
        if any(coef):
            op_s, flop_s = coef[0], dict(zip(t_precisions, coef[1:]))
        else:  # too few points: one rate per op
            op_s = statistics.mean(t / max(bare.work(c, b)[0], 1.0) for c, b, t in timed)
        opt_s = op_s * model.structure.optimizer.ops_per_tensor
    return Calibration(const, per_sample, op_s, flop_s, opt_s, len(measured), len(timed), uncertainty, single)


def _workspace_fit(residuals: Sequence[tuple[str, float, float]]
                   ) -> tuple[float, dict[str, float], dict[str, tuple[float, float, float]]]:
    """``const + per_sample[precision] * m`` (non-negative) through ``(precision, m, bytes)`` residuals, and
    the single-point readings (`Calibration.single_point`) of precisions measured at one micro-batch."""
    if not residuals:
        return 0.0, {}, {}
    precisions = sorted({p for p, _, _ in residuals})
    rows = [[1.0] + [m if precision == p else 0.0 for p in precisions] for precision, m, _ in residuals]
    coef = nonneg_least_squares(rows, [r for _, _, r in residuals])
    rates = dict(zip(precisions, coef[1:]))
    sizes = {p: {m for q, m, _ in residuals if q == p} for p in precisions}
    several = [rates[p] for p in precisions if len(sizes[p]) > 1]
    single = {}
    if several:
        slope = statistics.mean(several)
        for precision, m, r in residuals:
            if len(sizes[precision]) == 1:
                single[precision] = (m, max(r, 0.0), slope)
    return coef[0], rates, single
