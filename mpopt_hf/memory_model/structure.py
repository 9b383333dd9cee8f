"""What is exact about a model: parameter groups, optimizer state, the unit structure and each unit's status."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import MemoryConfig
from ..model.knobs import plan_knobs
from ..training.optimizer_state import QMAP_BYTES, state_bytes

STATUSES = ("T", "C", "S", "F")  # trainable, checkpointed (whole block), checkpointed selectively, frozen


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
    # an 8-bit step's own temporaries (bitsandbytes' CPU kernel dequantizes a tensor's moments to fp32 inside one
    # op, unseen by MemTracker), in bytes per element of the largest 8-bit tensor; probed, 0 where none is
    low_bit_per_element: float = 0.0

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
    # for an optimizer whose moments can be 8-bit (`optimizer_state`): (group, elements, has state) of every
    # parameter it holds, and its smallest 8-bit tensor; 0: the optimizer keeps fp32 moments only
    state_entries: tuple[tuple[int, int, bool], ...] = ()
    low_bit_min_size: int = 0

    def _trains(self, config: MemoryConfig) -> Callable[[int], bool]:
        n_frozen = plan_knobs(config, self.n_blocks).n_frozen
        return lambda group: group == -2 or (group == -1 and not n_frozen) or group >= n_frozen

    def low_bit_transient(self, config: MemoryConfig) -> float:
        """The 8-bit step's temporaries: per element of its largest 8-bit tensor (0 for fp32 moments)."""
        if config.optimizer_state != "8bit" or not self.low_bit_min_size:
            return 0.0
        trains = self._trains(config)
        sizes = [n for group, n, _ in self.state_entries if trains(group) and n >= self.low_bit_min_size]
        return self.optimizer.low_bit_per_element * max(sizes, default=0)

    def input_bytes(self, batch_size: int) -> float:
        return self.input_bytes_const + self.input_bytes_per_sample * batch_size

    def grad_bytes(self, config: MemoryConfig) -> float:
        """Every gradient of the parameters that train under ``config``."""
        return float(sum(g.grad_bytes for g in self.groups(config)))

    def optimizer_step_bytes(self, config: MemoryConfig, batch_size: int, transient: float) -> float:
        """The optimizer step's peak: weights, moments, inputs and every gradient, plus the step's ``transient``."""
        return (self.weights_bytes + self.optimizer_state_bytes(config) + self.input_bytes(batch_size)
                + self.grad_bytes(config) + transient)

    def optimizer_state_bytes(self, config: MemoryConfig) -> float:
        """The optimizer's state under ``config``: what it holds already plus what the trainable tensors add."""
        if not self.low_bit_min_size:
            if config.optimizer_state != "fp32":
                raise ValueError(f"{config.short()} asks for optimizer_state={config.optimizer_state!r}, but the "
                                 "profiled optimizer keeps fp32 moments only; profile it with the trainer's optimizer "
                                 "built for 8-bit state (MPOptArguments.optimizer_states).")
            return self.existing_state_bytes + sum(g.fresh_tensors * self.optimizer.state_a
                                                   + g.fresh_bytes * self.optimizer.state_b for g in self.groups(config))
        trains = self._trains(config)
        held = [n for group, n, has_state in self.state_entries if has_state or trains(group)]
        total = sum(state_bytes(n, config.optimizer_state, self.low_bit_min_size) for n in held)
        low_bit = config.optimizer_state == "8bit" and any(n >= self.low_bit_min_size for n in held)
        return float(total + (QMAP_BYTES if low_bit else 0))

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
        ckpt, checkpointed = set(plan.checkpointed), "S" if plan.selective else "C"
        out = []
        for kind, block in zip(self.unit_kinds, self.unit_blocks):
            if kind == "stem":
                out.append("F" if plan.n_frozen else "T")
            elif kind == "block":
                out.append("F" if block < plan.n_frozen else checkpointed if block in ckpt else "T")
            else:
                out.append("T")
        return out + ["F" if plan.n_frozen else "T"]


def body_bytes_of(statuses: Sequence[str], kinds: Sequence[str], block_of: Sequence[int], stem: ParamGroup,
                  blocks: Sequence[ParamGroup]) -> dict[str, float]:
    out = dict.fromkeys(STATUSES, 0.0)
    stem_status = next((st for st, kind in zip(statuses, kinds) if kind == "stem"), statuses[-1])
    out[stem_status] += stem.grad_bytes
    for st, kind, block in zip(statuses, kinds, block_of):
        if kind == "block":
            out[st] += blocks[block].grad_bytes
    return out
