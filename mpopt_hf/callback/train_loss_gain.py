"""A gain signal without a probe set: the training loss the steps compute anyway.

With no evaluation data (``gain_metric='auto'``, or ``'train_loss'``), a trial's metric is the negative mean
training loss over the second half of its steps (its standard error from their spread), and a race's start is
the loss of its first step, computed on the race's start weights. Measuring it costs no forward pass, so the
search spends nothing on evaluation and trials last ``trial_steps`` steps. The batches differ from trial to
trial (the loader goes on), so a race's trials are compared on the same *data stream*, not the same batches:
with a handful of steps per trial the standard error says how much of a lead is noise.
"""

from __future__ import annotations

import math
from collections import deque


class TrainLossGain:
    """Keeps the last ``keep`` steps' training losses and scores the current trial's last half."""

    def __init__(self, keep: int = 256) -> None:
        self.losses: deque[float] = deque(maxlen=keep)

    def add(self, loss: float | None) -> None:
        if loss is not None:
            self.losses.append(loss if math.isfinite(loss) else float("inf"))

    @property
    def last(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def metric(self, trial_steps_done: int) -> tuple[float | None, float | None]:
        """(metric, standard error): minus the mean loss of the later half of the current trial's
        ``trial_steps_done`` steps (at least the last step); (None, None) before any step."""
        if not self.losses:
            return None, None
        window = list(self.losses)[-max(1, math.ceil(max(trial_steps_done, 1) / 2)):]
        finite = [v for v in window if math.isfinite(v)]
        if not finite:
            return -1e30, 0.0  # a diverged trial scores as the worst
        mean = sum(finite) / len(finite)
        spread = sum((v - mean) ** 2 for v in finite) / max(len(finite) - 1, 1)
        return -mean, math.sqrt(spread / len(finite)) if len(finite) > 1 else None


__all__ = ["TrainLossGain"]
