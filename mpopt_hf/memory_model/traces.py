"""Spans of a step and their costs per status, cut from fake-tensor traces at two micro-batch sizes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .envelope import Affine, upper_envelope
from .least_squares import _solve_signed


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
    flops: Affine = Affine(0.0)  # noqa: RUF009 - frozen, so one shared default is safe


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


def _status_of(span: Span, statuses: list[str]) -> str:
    if span.unit == FORWARD_END:
        return "T"
    if span.unit < 0:
        return statuses[-1] if span.phase == "fwd" else "T"
    return statuses[span.unit]


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
    trained = ("T", "C", "S")  # the statuses whose body parameters get gradients
    base_small, base_large, base_body = min(seen, key=lambda e: sum(e[2].get(st, 0) for st in trained))
    base = span_cost(base_small, base_large, *sizes)
    statuses = [st for st in trained if any(body.get(st, 0) > 0 for *_, body in seen)]
    rows = [[body.get(st, 0.0) - base_body.get(st, 0.0) for st in statuses] for *_, body in seen]
    at_small = _solve_signed(rows, [small.change - base_small.change for small, _, _ in seen]) if statuses else []
    at_large = _solve_signed(rows, [large.change - base_large.change for _, large, _ in seen]) if statuses else []
    rates = {st: Affine.through(sizes[0], a, sizes[1], b) for st, a, b in zip(statuses, at_small, at_large)}
    lines = [line for small, large, _ in seen for line in span_cost(small, large, *sizes).peaks]
    base = SpanCost(base.change, base.grads, upper_envelope(lines), base.ops, base.flops)
    return Span(key[0], key[1], {"T": base}, rates)
