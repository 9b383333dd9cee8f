"""What a training step needs to be run again after a failure: an undo of the optimizer step, and a count of
skipped non-finite steps (the random state is `mpopt_hf.training.grad_cache.RngState`).

An out-of-memory error can strike anywhere in a step, the optimizer step included: that is where AdamW
creates its state at the first step, the most common real out-of-memory error. Running the step again is
exact only if nothing of the failed attempt stays behind: the dropout masks are drawn again from the same
random state, and an optimizer step that failed part-way is undone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class OptimizerRollback:
    """Records, before an optimizer step, what the step may change, so that a failed step can be undone.

    The state an optimizer creates lazily (AdamW's moments at the first step) is removed again. An in-place
    update of state that existed before, or of a parameter, is seen through the tensors' version counters; it
    cannot be undone without a copy of everything the optimizer holds, which is what memory is short of, so
    `undo` refuses with an error that says so instead of retrying from a half-applied step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        inner = optimizer
        while hasattr(inner, "optimizer") and isinstance(getattr(inner, "optimizer"), torch.optim.Optimizer):
            inner = inner.optimizer  # accelerate's AcceleratedOptimizer wraps the torch optimizer
        self.optimizer = inner
        self.params = [p for group in inner.param_groups for p in group["params"]]
        self.had_state = {id(p) for p in self.params if inner.state.get(p)}
        self.versions = {id(t): (t, t._version) for t in self._tensors()}

    def _tensors(self) -> list[torch.Tensor]:
        tensors = list(self.params)
        for p in self.params:
            if id(p) in self.had_state:
                tensors += [v for v in self.optimizer.state[p].values() if torch.is_tensor(v)]
        return tensors

    def changed(self) -> int:
        """How many weights or older state tensors the step has updated in place so far."""
        return sum(1 for t, version in self.versions.values() if t._version != version)

    def undo(self, refuse: bool | None = None) -> None:
        """Remove the state the failed step created; raise if it had already changed weights or older state
        (``refuse``: the decision taken for every rank together; None decides from this process alone)."""
        state = self.optimizer.state
        for p in self.params:
            if id(p) not in self.had_state and p in state:
                del state[p]
        changed = self.changed()
        if refuse is None:
            refuse = changed > 0
        if refuse:
            raise RuntimeError(
                f"The optimizer step ran out of memory after it had updated {changed} tensor(s) in place (weights "
                "or optimizer state; on this or another rank), so it cannot be undone and the step cannot be run "
                "again exactly. Resume from the last checkpoint with a smaller memory budget, or lower the "
                "optimizer step's own peak (an optimizer built with foreach=False, passed as "
                "Trainer(optimizers=(optimizer, None)))."
            )


@dataclass
class NonFiniteSteps:
    """Steps skipped because their loss or gradient norm was not finite; ``patience`` in a row stop training."""

    patience: int = 3
    skipped: list[int] = field(default_factory=list)
    streak: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"max_nonfinite_steps must be an int >= 1, got {self.patience!r}.")

    def note(self, step: int, what: str) -> None:
        """Count a skipped step; raise once ``patience`` steps in a row were skipped."""
        self.skipped.append(step)
        self.streak.append(step)
        if len(self.streak) >= self.patience:
            raise RuntimeError(
                f"The {what} was not finite at steps {self.streak} ({len(self.streak)} in a row; skipped so far: "
                f"{self.skipped}). Each was skipped, so the weights are those before step {self.streak[0]}. Try a "
                "lower learning_rate, gradient clipping (max_grad_norm), precision='fp32' instead of fp16/bf16, or "
                "check the data of these steps; max_nonfinite_steps sets how many in a row are tolerated."
            )

    def applied(self) -> None:
        """A step was applied: the streak is broken."""
        self.streak.clear()
