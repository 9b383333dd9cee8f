"""Least squares for a handful of unknowns, in plain Python (no numpy): with and without a sign constraint."""

from __future__ import annotations

from collections.abc import Sequence


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


def _solve_signed(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Least squares without a sign constraint (rates of freed bytes are negative)."""
    n = len(rows[0])
    usable = [j for j in range(n) if any(abs(r[j]) > 0 for r in rows)]
    coef = _solve_normal([[r[j] for j in usable] for r in rows], targets) if usable else None
    out = [0.0] * n
    for j, c in zip(usable, coef or []):
        out[j] = c
    return out
