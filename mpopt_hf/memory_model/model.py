"""The memory model: structure + traced spans + calibration, predicting a configuration's peak and step time.

A fitted model round-trips through JSON (`MemoryModel.to_dict` / `from_dict`) into the profile store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import MIB, PRECISIONS, MemoryConfig
from ..model.knobs import plan_knobs
from .calibration import Calibration, fit_calibration
from .envelope import Affine, envelope_max
from .structure import ModelStructure, OptimizerCost, ParamGroup
from .traces import Span, SpanCost, _status_of

FORMAT_VERSION = 5  # 4: never_grad, the calibration's fit uncertainty; 5: 8-bit optimizer state entries


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
        return self.peak_bytes / MIB

    def categories_mib(self) -> dict[str, float]:
        names = ("weights", "gradients", "optimizer_state", "activations", "temporaries", "inputs")
        return {name: getattr(self, name) / MIB for name in names}


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

    def spans_for(self, config: MemoryConfig) -> list[Span]:
        if config.lora_rank:
            raise ValueError(
                f"The profiled memory model does not price LoRA adapters ({config.short()}) yet; cost such "
                "configurations with a fake-tensor step each (MPOptArguments(cost_predictor='fake'), or "
                "mpopt_hf.profiler.predict_step).")
        if config.precision not in self.precisions:
            raise ValueError(
                f"The memory model was traced for precisions {list(self.precisions)}, not {config.precision!r}; "
                "re-fit it with that precision in the space."
            )
        context = self.context(config, self.structure.n_blocks)
        spans = self.spans.get(f"{config.precision}/{context}") or self.spans[f"{config.precision}/plain"]
        if config.selective and context == "ckpt" and not any("S" in span.costs for span in spans):
            raise ValueError(
                f"The memory model was traced without selective checkpointing, which {config.short()} uses; "
                "re-fit it with checkpoint_policy='selective' in the space."
            )
        return spans

    @property
    def selective(self) -> bool:
        """True when selectively checkpointed blocks were traced (status "S")."""
        return any("S" in span.costs for spans in self.spans.values() for span in spans)

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
        for span in self.spans_for(config):
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
        grads = s.grad_bytes(config)
        opt_state = s.optimizer_state_bytes(config)
        inputs = s.input_bytes(batch_size)
        static = s.weights_bytes + opt_state + inputs
        workspace = cal.workspace(config.precision, m)
        peak_first, peak_later, ret_first, ret_later, grads_first = self._dynamic(config, m)
        opt_transient = max(s.optimizer.transient(s.trainable_in_optimizer_order(config)), s.low_bit_transient(config))
        candidates = [
            (static + peak_first + workspace, "first micro-batch", grads_first, ret_first, peak_first - ret_first - grads_first),
            (s.optimizer_step_bytes(config, batch_size, opt_transient), "optimizer step", grads, 0.0, opt_transient),
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
        for span in self.spans_for(config):
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

    def calibrate(self, measured: Sequence[tuple[MemoryConfig, int, float, float | None]]) -> MemoryModel:
        """Fit the calibration from measurements ``(config, batch_size, peak_bytes, step_s)`` (<= 3 suffice)."""
        self.calibration = fit_calibration(self, measured)
        return self

    # -- persistence --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "structure": asdict(self.structure),
                "spans": {p: [_span_to_dict(s) for s in spans] for p, spans in self.spans.items()},
                "calibration": asdict(self.calibration)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryModel:
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
        st["state_entries"] = tuple((int(g), int(n), bool(h)) for g, n, h in st.get("state_entries", ()))
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
