"""Build a model's memory model without running it: trace its step on fake tensors under the few
configurations whose spans determine every other one, and combine them with the exact terms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..config import MemoryConfig
from ..memory_model import (
    MemoryModel,
    ModelStructure,
    Span,
    body_bytes_of,
    combine_traces,
    split_spans,
)
from ..model.blocks import find_blocks
from ..model.knobs import knob_state, remove_knobs
from .fake import fake_batch, fake_setup
from .spans import trace_step
from .structure import model_structure, units_of


def _mode_statuses(kinds: list[str], n: int, stem: str, blocks: Sequence[str]) -> list[str]:
    out, block = [], 0
    for kind in kinds:
        if kind == "stem":
            out.append(stem)
        elif kind == "block":
            out.append(blocks[block])
            block += 1
        else:
            out.append("T")
    return out + [stem]


def build_memory_model(
    model: nn.Module,
    batch: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    precisions: Iterable[str] = ("fp32", "bf16"),
    sizes: tuple[int, int] = (2, 4),
    selective: bool = False,
) -> MemoryModel:
    """Trace the model on fake tensors and derive the exact terms; uncalibrated.

    Per precision, at two micro-batch sizes: every block trainable (T) and all frozen (F); then,
    in the checkpointing context (HF models change globally once any layer checkpoints), every
    block checkpointed (C), with ``selective`` every block checkpointed selectively (S), and, when
    the context changes anything, T and F again.
    """
    blocks = find_blocks(model)
    setup = fake_setup(model, optimizer, batch)
    fake_blocks = find_blocks(setup.model)
    units, kinds, _ = units_of(fake_blocks)
    n = fake_blocks.n_blocks
    batches = {size: fake_batch(setup, batch, size) for size in sizes}
    structure: ModelStructure | None = None  # after the first all-trainable trace: it finds `setup.never_grad`

    def trace(precision: str, rate: float, segments: int, plain: Iterable[nn.Module] = (),
              only: Sequence[int] = sizes, policy: str = "block") -> list[list]:
        out = []
        for size in only:
            setup.batch = batches[size]
            config = MemoryConfig(size, rate, segments, precision, checkpoint_policy=policy)
            out.append(split_spans(trace_step(setup, config, units, plain)))
        return out

    spans: dict[str, list[Span]] = {}
    all_t, all_f, all_c = ["T"] * n, ["F"] * n, ["C"] * n

    def mode(stem: str, statuses: Sequence[str]) -> tuple[list[str], dict[str, float]]:
        full = _mode_statuses(kinds, n, stem, statuses)
        return full, body_bytes_of(full, structure.unit_kinds, structure.unit_blocks, structure.stem, structure.blocks)

    for precision in precisions:
        t = trace(precision, 0.0, 0)
        if structure is None:  # which parameters a backward reaches is known now
            structure = model_structure(model, batch, optimizer, blocks, setup.never_grad or ())
        f = trace(precision, 1.0, 0)
        c = trace(precision, 0.0, n)
        # the library's own checkpointing switches the whole model into a context (e.g. no KV cache);
        # our wrapper (blocks the library cannot reach) does not, and its blocks have no flag to clear
        state = knob_state(setup.model)
        flagged = [b for b in fake_blocks.blocks if hasattr(b, "gradient_checkpointing")] \
            if state is not None and state.hf_checkpointing else []
        spans[f"{precision}/plain"] = combine_traces(
            [(*t, *mode("T", all_t)), (*f, *mode("F", all_f))], sizes)
        spans[f"{precision}/frozen"] = combine_traces([(*f, *mode("F", all_f))], sizes)
        ckpt_traces = [(*c, *mode("T", all_c))]
        if selective:
            ckpt_traces.append((*trace(precision, 0.0, n, policy="selective"), *mode("T", ["S"] * n)))
        # T and F inside the checkpointing context: all blocks flagged, then the flags cleared
        t_ctx = trace(precision, 0.0, n, flagged, only=sizes[:1]) if flagged else [t[0]]
        if t_ctx[0] != t[0]:
            t_ctx += trace(precision, 0.0, n, flagged, only=sizes[1:])
            ckpt_traces.append((*t_ctx, *mode("T", all_t)))
            if n > 1:
                f_ctx = trace(precision, (n - 1) / n, 1, flagged)
                ckpt_traces.append((*f_ctx, *mode("F", ["F"] * (n - 1) + ["T"])))
            fallback = [(*t, mode("T", all_t)[0], None), (*f, mode("F", all_f)[0], None)]
        else:
            fallback = [(*t, *mode("T", all_t)), (*f, *mode("F", all_f))]
        ckpt_traces += fallback
        spans[f"{precision}/ckpt"] = combine_traces(ckpt_traces, sizes)
    remove_knobs(setup.model)
    return MemoryModel(structure or model_structure(model, batch, optimizer, blocks), spans)
