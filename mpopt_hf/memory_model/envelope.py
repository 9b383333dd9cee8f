"""Piecewise-affine maths: costs as lines in the micro-batch size, and the upper envelope of many."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Affine:
    """``a + b * m`` bytes (or seconds, or ops) for a micro-batch of ``m`` samples."""

    a: float
    b: float = 0.0

    def __call__(self, m: float) -> float:
        return self.a + self.b * m

    @classmethod
    def through(cls, m0: float, y0: float, m1: float, y1: float) -> Affine:
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
