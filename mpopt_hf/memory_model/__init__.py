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

Modules, from the bottom up (each imports only those above it in this list; `calibration` names
`MemoryModel` for type checking only):

    envelope       `Affine` lines in the micro-batch size and their upper envelope
    least_squares  small solvers, with and without a sign constraint
    structure      what is exact: parameter groups, optimizer state, each unit's status
    traces         spans of a step and their costs per status, from fake-tensor traces
    calibration    what measurements add (workspaces, allocator) and the time model's rates
    model          `MemoryModel`: predict a configuration's peak and step time; (de)serialise a fit
    space          the configuration grid, its smallest peak and the budget check
"""

from .calibration import Calibration, fit_calibration
from .envelope import Affine, envelope_max, upper_envelope
from .least_squares import nonneg_least_squares
from .model import FORMAT_VERSION, MemoryModel, Prediction
from .space import BudgetTooSmallError, check_budget, config_space, min_peak
from .structure import (
    STATUSES,
    ModelStructure,
    OptimizerCost,
    ParamGroup,
    body_bytes_of,
)
from .traces import (
    FORWARD_END,
    RawSpan,
    Record,
    Span,
    SpanCost,
    combine_traces,
    span_cost,
    split_spans,
)

__all__ = [
    "FORMAT_VERSION", "FORWARD_END", "STATUSES", "Affine", "BudgetTooSmallError", "Calibration", "MemoryModel",
    "ModelStructure", "OptimizerCost", "ParamGroup", "Prediction", "RawSpan", "Record", "Span", "SpanCost",
    "body_bytes_of", "check_budget", "combine_traces", "config_space", "envelope_max", "fit_calibration", "min_peak",
    "nonneg_least_squares", "span_cost", "split_spans", "upper_envelope",
]
