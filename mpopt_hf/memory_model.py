"""Predict the peak memory and step time of every configuration from a few traces and measurements.

Plain dataclasses and functions (no model, no torch tensors), so the decision maths are testable
on their own and a fitted model round-trips through JSON into the profile store.

The peak of a step is ``max`` over three moments::

    first micro-batch   static + dynamic path of micro-batch 1 (gradients appear during backward)
    later micro-batches static + gradients(trainable) + dynamic path (gradients accumulate in place)
    optimizer step      static + gradients(trainable) + optimizer transient

with ``static = weights + optimizer state + inputs`` derived exactly from parameter shapes and the
batch. The *dynamic path* walks the step's spans (one per unit - stem module, block, head module -
in forward then backward order, plus the forward's end); each span's memory change and local peak
are affine in the micro-batch size and come from fake-tensor traces of the model with every block
trainable (T), checkpointed (C) or frozen (F), at two micro-batch sizes. A configuration picks,
per span, the trace of its unit's status; configurations with checkpointing use traces taken in the
checkpointing context (HF models change globally once a layer checkpoints, e.g. drop the KV cache).
What tensors cannot show (allocator rounding, kernel workspaces) is calibrated from <= 3
measurements as ``const + per_sample[precision] * micro_batch``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import PRECISIONS, MemoryConfig
from .knobs import plan_knobs

MiB = 2**20
STATUSES = ("T", "C", "F")  # trainable, checkpointed, frozen
FORMAT_VERSION = 4  # 4: never_grad, the calibration's fit uncertainty


class BudgetTooSmallError(ValueError):
    """No configuration of the space fits the memory budget."""

    def __init__(self, budget_mib: float, min_peak_mib: float, config: MemoryConfig) -> None:
        self.budget_mib, self.min_peak_mib, self.config = budget_mib, min_peak_mib, config
        super().__init__(
            f"A memory budget of {budget_mib:.1f} MiB is below the smallest predicted peak of this configuration "
            f"space, {min_peak_mib:.1f} MiB (reached by {config.short()}); raise the budget to at least "
            f"{math.ceil(min_peak_mib)} MiB or shrink the model/batch."
        )


# ----------------------------------------------------------------------------- building blocks


@dataclass(frozen=True)
class Affine:
    """``a + b * m`` bytes (or seconds, or ops) for a micro-batch of ``m`` samples."""

    a: float
    b: float = 0.0

    def __call__(self, m: float) -> float:
        return self.a + self.b * m

    @classmethod
    def through(cls, m0: float, y0: float, m1: float, y1: float) -> "Affine":
        b = (y1 - y0) / (m1 - m0)
        return cls(y0 - b * m0, b)


def upper_envelope(lines: Iterable[Affine], m_min: float = 1.0) -> tuple[Affine, ...]:
    """The few lines whose maximum equals the maximum of all of them for every ``m >= m_min``."""
    best: dict[float, float] = {}
    for line in lines:  # one line per slope, the highest
        if line.b not in best or line.a > best[line.b]:
            best[line.b] = line.a
    hull: list[Affine] = []
    for b in sorted(best):
        line = Affine(best[b], b)
        while hull:
            top = hull[-1]
            if line(m_min) >= top(m_min):  # steeper and not lower at the start: top never wins
                hull.pop()
                continue
            if len(hull) >= 2:
                prev = hull[-2]
                # top wins nowhere if line overtakes prev before top does
                x_prev_top = (prev.a - top.a) / (top.b - prev.b)
                x_prev_line = (prev.a - line.a) / (line.b - prev.b)
                if x_prev_line <= x_prev_top:
                    hull.pop()
                    continue
            break
        hull.append(line)
    return tuple(hull)


def envelope_max(lines: Sequence[Affine], m: float) -> float:
    return max(line(m) for line in lines) if lines else 0.0


@dataclass(frozen=True)
class SpanCost:
    """One stretch of a step run by one unit, under one status, as functions of the micro-batch size.

    ``change``: dynamic memory after minus before; ``grads``: the part of it that is parameter
    gradients (they stay after the first micro-batch, later ones accumulate into them);
    ``peaks``: the envelope of the dynamic memory above the span's start; ``ops``/``flops``: work.
    """

    change: Affine
    grads: Affine
    peaks: tuple[Affine, ...]
    ops: float = 0.0
    flops: Affine = Affine(0.0)


FORWARD_END = -3  # the pseudo-unit from the model's return to the start of backward (autocast exit, loss)


@dataclass(frozen=True)
class Span:
    """A span of the step and its cost under each status its unit can take (``unit=-1``: glue).

    The forward-end span frees what autocast cached for trainable weights and did not save for
    backward (and outputs such as KV caches), so its change also has a term per byte of body
    (stem + block) parameters of each status: ``per_param[status](m) * bytes``.
    """

    phase: str
    unit: int
    costs: dict[str, SpanCost]
    per_param: dict[str, Affine] = field(default_factory=dict)


@dataclass(frozen=True)
class ParamGroup:
    """Parameters that freeze together: the stem, one block, or the rest (head, always trainable)."""

    grad_bytes: int = 0  # bytes of gradients (= parameters that can train)
    tensors: int = 0
    max_tensor_bytes: int = 0
    fresh_tensors: int = 0  # trainable, held by the optimizer, no state yet
    fresh_bytes: int = 0


@dataclass(frozen=True)
class OptimizerCost:
    """Optimizer state bytes per parameter tensor (``state_a + state_b * bytes``) and the step's transient:
    ``largest * largest_bytes + second * second_bytes + total * all_bytes`` of the trainable tensors
    (single-tensor loops hit the first two, foreach/fused implementations the last)."""

    state_a: float = 0.0
    state_b: float = 0.0
    largest: float = 0.0
    second: float = 0.0
    total: float = 0.0
    ops_per_tensor: float = 0.0

    def transient(self, sizes: Sequence[float]) -> float:
        """Transient of one step over the trainable tensors' bytes, in the optimizer's order (a
        single-tensor loop keeps the previous tensor's temporaries while it works on the next)."""
        peak, previous = 0.0, 0.0
        for size in sizes:
            peak = max(peak, self.largest * size + self.second * previous)
            previous = size
        return peak + self.total * sum(sizes)


@dataclass(frozen=True)
class ModelStructure:
    """What is exact: sizes from parameter shapes, the block structure and the batch."""

    n_blocks: int
    unit_kinds: tuple[str, ...]  # "stem", "block", "head" per unit
    unit_blocks: tuple[int, ...]  # block index per unit (-1 for stem/head)
    weights_bytes: int
    input_bytes_per_sample: float
    input_bytes_const: float
    existing_state_bytes: int
    stem: ParamGroup
    blocks: tuple[ParamGroup, ...]
    rest: ParamGroup
    optimizer: OptimizerCost
    device_type: str = "cpu"
    # every trainable tensor the optimizer holds, in its order: (group, bytes); group -1 stem, -2 rest, i block i
    optimizer_order: tuple[tuple[int, int], ...] = ()
    never_grad: tuple[int, ...] = ()  # parameters (by index) the traced backward gave no gradient

    def groups(self, config: MemoryConfig) -> list[ParamGroup]:
        """The parameter groups that train under ``config``."""
        n_frozen = plan_knobs(config, self.n_blocks).n_frozen
        return ([] if n_frozen else [self.stem]) + list(self.blocks[n_frozen:]) + [self.rest]

    def trainable_in_optimizer_order(self, config: MemoryConfig) -> list[int]:
        n_frozen = plan_knobs(config, self.n_blocks).n_frozen
        return [size for group, size in self.optimizer_order
                if group == -2 or (group == -1 and not n_frozen) or group >= n_frozen]

    def body_bytes(self, config: MemoryConfig) -> dict[str, float]:
        """Bytes of stem and block parameters by status (T, C, F) under ``config``."""
        return body_bytes_of(self.statuses(config), self.unit_kinds, self.unit_blocks, self.stem, self.blocks)

    def statuses(self, config: MemoryConfig) -> list[str]:
        """Status per unit, then the forward glue's (frozen with the stem) as the last element."""
        plan = plan_knobs(config, self.n_blocks)
        ckpt = set(plan.checkpointed)
        out = []
        for kind, block in zip(self.unit_kinds, self.unit_blocks):
            if kind == "stem":
                out.append("F" if plan.n_frozen else "T")
            elif kind == "block":
                out.append("F" if block < plan.n_frozen else "C" if block in ckpt else "T")
            else:
                out.append("T")
        return out + ["F" if plan.n_frozen else "T"]


def body_bytes_of(statuses: Sequence[str], kinds: Sequence[str], block_of: Sequence[int], stem: ParamGroup,
                  blocks: Sequence[ParamGroup]) -> dict[str, float]:
    out = {"T": 0.0, "C": 0.0, "F": 0.0}
    stem_status = next((st for st, kind in zip(statuses, kinds) if kind == "stem"), statuses[-1])
    out[stem_status] += stem.grad_bytes
    for st, kind, block in zip(statuses, kinds, block_of):
        if kind == "block":
            out[st] += blocks[block].grad_bytes
    return out


def _status_of(span: "Span", statuses: list[str]) -> str:
    if span.unit == FORWARD_END:
        return "T"
    if span.unit < 0:
        return statuses[-1] if span.phase == "fwd" else "T"
    return statuses[span.unit]


@dataclass(frozen=True)
class Calibration:
    """What measurements add to the traced tensor bytes: kernel workspaces and allocator effects, as a
    constant plus bytes per sample of the micro-batch, per precision (kernels differ); a precision
    nobody measured takes the mean of the others."""

    const_bytes: float = 0.0
    per_sample_bytes: dict[str, float] = field(default_factory=dict)

    def workspace(self, precision: str, micro_batch: float) -> float:
        rates = self.per_sample_bytes
        rate = rates.get(precision, statistics.mean(rates.values()) if rates else 0.0)
        bytes_ = self.const_bytes + rate * micro_batch
        if precision in self.single_point:  # one reading cannot split a constant from a rate: take the higher
            m0, r0, slope = self.single_point[precision]
            bytes_ = max(bytes_, r0 + slope * (micro_batch - m0))
        return bytes_
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


@dataclass(frozen=True)
class Prediction:
    """Predicted cost of one configuration; bytes by category at the predicted peak."""

    config: MemoryConfig
    peak_bytes: float
    weights: float
    gradients: float
    optimizer_state: float
    activations: float
    temporaries: float
    inputs: float
    step_s: float
    phase: str  # where the peak is: "first micro-batch", "later micro-batches", "optimizer step"

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MiB

    def categories_mib(self) -> dict[str, float]:
        names = ("weights", "gradients", "optimizer_state", "activations", "temporaries", "inputs")
        return {name: getattr(self, name) / MiB for name in names}


# ----------------------------------------------------------------------------- the model


@dataclass
class MemoryModel:
    """Structure + traced spans per precision + calibration: predicts any configuration in microseconds."""

    structure: ModelStructure
    # "<precision>/<context>" -> spans in execution order, costs per status. Contexts: "plain" (no
    # checkpointing anywhere), "ckpt" (some: HF models then change globally, e.g. drop their KV cache),
    # "frozen" (every block frozen: the all-frozen trace itself, exact).
    spans: dict[str, list[Span]]
    calibration: Calibration = field(default_factory=Calibration)

    @staticmethod
    def context(config: MemoryConfig, n_blocks: int) -> str:
        if plan_knobs(config, n_blocks).n_frozen == n_blocks:
            return "frozen"
        return "ckpt" if config.checkpoint_segments else "plain"

    def _spans_for(self, config: MemoryConfig) -> list[Span]:
        if config.precision not in self.precisions:
            raise ValueError(
                f"The memory model was traced for precisions {list(self.precisions)}, not {config.precision!r}; "
                "re-fit it with that precision in the space."
            )
        context = self.context(config, self.structure.n_blocks)
        return self.spans.get(f"{config.precision}/{context}") or self.spans[f"{config.precision}/plain"]

    @property
    def precisions(self) -> tuple[str, ...]:
        traced = {key.split("/")[0] for key in self.spans}
        return tuple(p for p in PRECISIONS if p in traced)

    # -- memory ---------------------------------------------------------------

    def _dynamic(self, config: MemoryConfig, m: float) -> tuple[float, float, float, float, float]:
        """Peak dynamic bytes of the first and of a later micro-batch, with the split at each peak."""
        statuses = self.structure.statuses(config)
        body = self.structure.body_bytes(config)
        first = later = 0.0  # dynamic memory now
        grads_first = 0.0
        peak_first = peak_later = 0.0
        retained_first = retained_later = grads_at_first = 0.0
        for span in self._spans_for(config):
            status = _status_of(span, statuses)
            if span.phase == "bwd" and status == "F":
                continue
            cost = span.costs.get(status)
            if cost is None:
                continue
            excursion = envelope_max(cost.peaks, m)
            if first + excursion > peak_first:
                peak_first, retained_first, grads_at_first = first + excursion, first - grads_first, grads_first
            if later + excursion > peak_later:
                peak_later, retained_later = later + excursion, later
            change, grads = cost.change(m), cost.grads(m)
            change += sum(rate(m) * body.get(st, 0.0) for st, rate in span.per_param.items())
            first += change
            grads_first += grads
            later += change - grads
        return peak_first, peak_later, retained_first, retained_later, grads_at_first

    def predict(self, config: MemoryConfig, batch_size: int) -> Prediction:
        """Peak memory (bytes by category) and step time of ``config`` for an effective batch of ``batch_size``."""
        s, cal = self.structure, self.calibration
        m = min(config.micro_batch_size, batch_size)
        n_micro = math.ceil(batch_size / m)
        groups = s.groups(config)
        grads = float(sum(g.grad_bytes for g in groups))
        opt_state = s.existing_state_bytes + sum(g.fresh_tensors * s.optimizer.state_a + g.fresh_bytes * s.optimizer.state_b for g in groups)
        inputs = s.input_bytes_const + s.input_bytes_per_sample * batch_size
        static = s.weights_bytes + opt_state + inputs
        workspace = cal.workspace(config.precision, m)
        peak_first, peak_later, ret_first, ret_later, grads_first = self._dynamic(config, m)
        opt_transient = s.optimizer.transient(s.trainable_in_optimizer_order(config))
        candidates = [
            (static + peak_first + workspace, "first micro-batch", grads_first, ret_first, peak_first - ret_first - grads_first),
            (static + grads + opt_transient, "optimizer step", grads, 0.0, opt_transient),
        ]
        if n_micro > 1:
            candidates.append((static + grads + peak_later + workspace, "later micro-batches", grads, ret_later,
                               peak_later - ret_later))
        peak, phase, g_at, act, tmp = max(candidates, key=lambda c: c[0])
        if phase != "optimizer step":
            tmp += workspace
        return Prediction(
            config=config, peak_bytes=peak, weights=s.weights_bytes, gradients=g_at, optimizer_state=opt_state,
            activations=max(act, 0.0), temporaries=max(tmp, 0.0), inputs=inputs,
            step_s=self.predict_time(config, batch_size), phase=phase,
        )

    # -- time -----------------------------------------------------------------

    def work(self, config: MemoryConfig, batch_size: int) -> tuple[float, float, float]:
        """(ops, flops, trainable parameter tensors) of one step: the time model's features."""
        statuses = self.structure.statuses(config)
        m = min(config.micro_batch_size, batch_size)
        sizes = [m] * (batch_size // m) + ([batch_size % m] if batch_size % m else [])
        ops = flops = 0.0
        for span in self._spans_for(config):
            status = _status_of(span, statuses)
            if span.phase == "bwd" and status == "F":
                continue
            cost = span.costs.get(status)
            if cost is not None:
                ops += cost.ops * len(sizes)
                flops += sum(cost.flops(size) for size in sizes)
        tensors = float(sum(g.tensors for g in self.structure.groups(config)))
        return ops, flops, tensors

    def predict_time(self, config: MemoryConfig, batch_size: int) -> float:
        cal = self.calibration
        ops, flops, tensors = self.work(config, batch_size)
        flop_s = cal.flop_s.get(config.precision, cal.flop_s.get("fp32", 0.0))
        return cal.op_s * ops + flop_s * flops + cal.opt_tensor_s * tensors

    # -- fitting ----------------------------------------------------------------

    def calibrate(self, measured: Sequence[tuple[MemoryConfig, int, float, float | None]]) -> "MemoryModel":
        """Fit the calibration from measurements ``(config, batch_size, peak_bytes, step_s)`` (<= 3 suffice)."""
        self.calibration = fit_calibration(self, measured)
        return self

    # -- persistence --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "structure": asdict(self.structure),
                "spans": {p: [_span_to_dict(s) for s in spans] for p, spans in self.spans.items()},
                "calibration": asdict(self.calibration)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryModel":
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"Stored memory model has format {data.get('format')!r}, this library reads "
                             f"{FORMAT_VERSION}; it will be re-fitted.")
        st = dict(data["structure"])
        for name in ("unit_kinds", "unit_blocks", "never_grad"):
            st[name] = tuple(st[name])
        st["stem"], st["rest"] = ParamGroup(**st["stem"]), ParamGroup(**st["rest"])
        st["blocks"] = tuple(ParamGroup(**g) for g in st["blocks"])
        st["optimizer"] = OptimizerCost(**st["optimizer"])
        st["optimizer_order"] = tuple(tuple(pair) for pair in st.get("optimizer_order", ()))
        spans = {p: [_span_from_dict(s) for s in items] for p, items in data["spans"].items()}
        calibration = dict(data["calibration"])
        calibration["single_point"] = {k: tuple(v) for k, v in calibration.get("single_point", {}).items()}
        return cls(ModelStructure(**st), spans, Calibration(**calibration))


def _span_to_dict(span: Span) -> dict[str, Any]:
    return {"phase": span.phase, "unit": span.unit, "per_param": {k: [v.a, v.b] for k, v in span.per_param.items()},
            "costs": {
        k: {"change": [c.change.a, c.change.b], "grads": [c.grads.a, c.grads.b],
            "peaks": [[p.a, p.b] for p in c.peaks], "ops": c.ops, "flops": [c.flops.a, c.flops.b]}
        for k, c in span.costs.items()}}


def _span_from_dict(data: dict[str, Any]) -> Span:
    return Span(data["phase"], int(data["unit"]), {
        k: SpanCost(Affine(*c["change"]), Affine(*c["grads"]), tuple(Affine(*p) for p in c["peaks"]), c["ops"],
                    Affine(*c["flops"]))
        for k, c in data["costs"].items()}, {k: Affine(*v) for k, v in data.get("per_param", {}).items()})


# ----------------------------------------------------------------------------- calibration


def nonneg_least_squares(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Non-negative least squares for a handful of unknowns (active-set by elimination)."""
    n = len(rows[0]) if rows else 0
    active = list(range(n))
    while active:
        coef = _solve_normal([[r[j] for j in active] for r in rows], targets)
        if coef is None:
            active.pop()
            continue
        negative = [j for j, c in zip(active, coef) if c < 0]
        if not negative:
            out = [0.0] * n
            for j, c in zip(active, coef):
                out[j] = c
            return out
        active.remove(negative[0])
    return [0.0] * n


def _solve_normal(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float] | None:
    n = len(rows[0]) if rows else 0
    if n == 0 or len(rows) < n:
        return None
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(n)]
    a = [[sum(r[i] / scale[i] * r[j] / scale[j] for r in rows) for j in range(n)] for i in range(n)]
    y = [sum(r[i] / scale[i] * t for r, t in zip(rows, targets)) for i in range(n)]
    for col in range(n):  # Gaussian elimination with partial pivoting
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot], y[col], y[pivot] = a[pivot], a[col], y[pivot], y[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * z for x, z in zip(a[r], a[col])]
                y[r] -= f * y[col]
    return [y[i] / a[i][i] / scale[i] for i in range(n)]


def fit_calibration(model: MemoryModel, measured: Sequence[tuple[MemoryConfig, int, float, float | None]]) -> Calibration:
    """Workspace bytes (``const + per_sample[precision] * micro_batch``, non-negative) and time coefficients.

    Memory: the residual of each measurement against the traced prediction. Time: ``op_s * ops +
    flop_s[precision] * flops + opt_tensor_s * tensors`` fitted to the measured step times.
    """
    bare = MemoryModel(model.structure, model.spans, Calibration())
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
            ops, flops, tensors = bare.work(cfg, batch)
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


# ----------------------------------------------------------------------------- the space


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
) -> list[MemoryConfig]:
    """Every valid configuration of the knob grid (segments above the trainable block count are skipped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    sizes = sorted(set(micro_batch_sizes or _powers_of_two_upto(batch_size)))
    bad = [s for s in sizes if not 1 <= s <= batch_size]
    if bad:
        raise ValueError(f"micro_batch_sizes {bad} are outside 1..{batch_size} (the effective batch).")
    space = []
    for precision in precisions:
        for rate in freeze_rates:
            for segments in checkpoint_segments:
                for size in sizes:
                    cfg = MemoryConfig(size, rate, segments, precision)
                    try:
                        plan_knobs(cfg, n_blocks)
                    except ValueError:
                        continue
                    space.append(cfg)
    return list(dict.fromkeys(space))


def min_peak(model: MemoryModel, space: Iterable[MemoryConfig], batch_size: int) -> Prediction:
    """The configuration with the smallest predicted peak."""
    predictions = [model.predict(cfg, batch_size) for cfg in space]
    if not predictions:
        raise ValueError("The configuration space is empty.")
    return min(predictions, key=lambda p: p.peak_bytes)


def check_budget(model: MemoryModel, space: Iterable[MemoryConfig], batch_size: int, budget_mib: float) -> Prediction:
    """Raise `BudgetTooSmallError` (naming the minimum and its configuration) if nothing fits the budget."""
    if not budget_mib > 0:
        raise ValueError(f"The memory budget must be a positive number of MiB, got {budget_mib}.")
    best = min_peak(model, space, batch_size)
    if best.peak_mib > budget_mib:
        raise BudgetTooSmallError(budget_mib, best.peak_mib, best.config)
    return best


# ----------------------------------------------------------------------------- traces -> spans

# One op of a traced step: phase, owning unit (-1: glue), dynamic bytes before and after the op,
# gradient bytes before and after, flops.
Record = tuple[str, int, int, int, int, int, float]


@dataclass(frozen=True)
class RawSpan:
    """A span of one trace at one micro-batch size."""

    phase: str
    unit: int
    occurrence: int
    change: float
    grads: float
    peaks: tuple[float, ...]  # dynamic memory after each op, above the span's start
    flops: float

    @property
    def key(self) -> tuple[str, int, int]:
        return self.phase, self.unit, self.occurrence


def split_spans(records: Sequence[Record]) -> list[RawSpan]:
    """Cut a trace into spans: a new one starts when the phase or the owning unit changes (glue stays put)."""
    bounds: list[tuple[str, int, int]] = []  # phase, unit, first record index
    for i, (phase, owner, *_rest) in enumerate(records):
        if not bounds or phase != bounds[-1][0] or (owner != -1 and owner != bounds[-1][1]):
            bounds.append((phase, owner, i))
    seen: dict[tuple[str, int], int] = {}
    spans = []
    for j, (phase, unit, start) in enumerate(bounds):
        stop = bounds[j + 1][2] if j + 1 < len(bounds) else len(records)
        ops = records[start:stop]
        x0, g0 = ops[0][2], ops[0][4]
        if stop < len(records):
            x1, g1 = records[stop][2], records[stop][4]
        else:
            x1, g1 = ops[-1][3], ops[-1][5]
        occurrence = seen.get((phase, unit), 0)
        seen[(phase, unit)] = occurrence + 1
        spans.append(RawSpan(phase, unit, occurrence, x1 - x0, g1 - g0,
                             tuple(max(0, r[3] - x0) for r in ops), sum(r[6] for r in ops)))
    return spans


def span_cost(small: RawSpan, large: RawSpan, m_small: float, m_large: float) -> SpanCost:
    """Affine cost of one span from its traces at two micro-batch sizes."""
    if len(small.peaks) == len(large.peaks):  # same ops: one line per op, keep the envelope
        lines = [Affine.through(m_small, a, m_large, b) for a, b in zip(small.peaks, large.peaks)]
    else:  # pragma: no cover - fake traces are deterministic; kept for safety
        lines = [Affine.through(m_small, max(small.peaks, default=0), m_large, max(large.peaks, default=0))]
    return SpanCost(
        change=Affine.through(m_small, small.change, m_large, large.change),
        grads=Affine.through(m_small, small.grads, m_large, large.grads),
        peaks=upper_envelope(lines + [Affine(0.0)]),
        ops=float(len(large.peaks)),
        flops=Affine.through(m_small, small.flops, m_large, large.flops),
    )


def combine_traces(
    traces: Sequence[tuple[Sequence[RawSpan], Sequence[RawSpan], Sequence[str], dict[str, float] | None]],
    sizes: tuple[float, float],
) -> list[Span]:
    """Spans with a cost per status, from traces ``(spans at size 0, spans at size 1, unit statuses,
    body parameter bytes by status)``.

    The statuses list gives each unit's status in that trace, then the forward glue's; the first
    trace fixes the order, and the first trace that shows a span under a status gives its cost.
    The forward-end span is fitted across all traces as ``base + per_param . body bytes``.
    """
    costs: dict[tuple[str, int, int], dict[str, SpanCost]] = {}
    ends: dict[tuple[str, int, int], list[tuple[RawSpan, RawSpan, dict[str, float]]]] = {}
    for small, large, statuses, body in traces:  # body None: a fallback trace, not part of the end fit
        large_by_key = {s.key: s for s in large}
        for span in small:
            other = large_by_key.get(span.key)
            if other is None:
                continue
            if span.unit == FORWARD_END:
                if body is not None:
                    ends.setdefault(span.key, []).append((span, other, body))
                continue
            status = (statuses[-1] if span.phase == "fwd" else "T") if span.unit < 0 else statuses[span.unit]
            costs.setdefault(span.key, {}).setdefault(status, span_cost(span, other, *sizes))
    out = []
    for key in (s.key for s in traces[0][0]):
        if key in costs:
            out.append(Span(key[0], key[1], costs[key]))
        elif key in ends:
            out.append(_forward_end(key, ends[key], sizes))
    return out


def _forward_end(key: tuple[str, int, int], seen: list[tuple[RawSpan, RawSpan, dict[str, float]]],
                 sizes: tuple[float, float]) -> Span:
    """Base from the trace with the least trainable body, a rate per trainable/checkpointed body byte."""
    base_small, base_large, base_body = min(seen, key=lambda e: e[2].get("T", 0) + e[2].get("C", 0))
    base = span_cost(base_small, base_large, *sizes)
    statuses = [st for st in ("T", "C") if any(body.get(st, 0) > 0 for *_, body in seen)]
    rows = [[body.get(st, 0.0) - base_body.get(st, 0.0) for st in statuses] for *_, body in seen]
    at_small = _solve_signed(rows, [small.change - base_small.change for small, _, _ in seen]) if statuses else []
    at_large = _solve_signed(rows, [large.change - base_large.change for _, large, _ in seen]) if statuses else []
    rates = {st: Affine.through(sizes[0], a, sizes[1], b) for st, a, b in zip(statuses, at_small, at_large)}
    lines = [line for small, large, _ in seen for line in span_cost(small, large, *sizes).peaks]
    base = SpanCost(base.change, base.grads, upper_envelope(lines), base.ops, base.flops)
    return Span(key[0], key[1], {"T": base}, rates)


def _solve_signed(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Least squares without a sign constraint (rates of freed bytes are negative)."""
    n = len(rows[0])
    usable = [j for j in range(n) if any(abs(r[j]) > 0 for r in rows)]
    coef = _solve_normal([[r[j] for j in usable] for r in rows], targets) if usable else None
    out = [0.0] * n
    for j, c in zip(usable, coef or []):
        out[j] = c
    return out
