"""One point of the memory-knob space.

A `MemoryConfig` says *how* a training step is run, never *what* is learned: two
configurations that differ only in their knobs give the same gradient for the
same effective batch (up to floating point), but different peak memory and
step time. That is what lets the engine switch between them online.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class MemoryConfig:
    """The memory-related hyperparameters of one training step."""

    micro_batch_size: int = field(
        metadata={
            "help": "Samples per forward/backward. The effective batch (what the data loader yields) is split into "
            "micro-batches of this size and their gradients are accumulated, so the effective batch is kept."
        }
    )
    freeze_rate: float = field(
        default=0.0,
        metadata={
            "help": "Share of the model's repeated blocks, counted from the input side, whose parameters are frozen "
            "(the stem/embeddings are frozen with them whenever the rate is above 0). The head always trains."
        },
    )
    checkpoint_segments: int = field(
        default=0,
        metadata={
            "help": "How many trainable blocks are activation-checkpointed, spread evenly over them; each "
            "checkpointed block keeps only its input and recomputes the rest in backward. 0 turns it off."
        },
    )
    precision: str = field(
        default="fp32",
        metadata={"help": f"Autocast precision, one of {PRECISIONS}. fp16 needs CUDA and uses a loss scaler."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.micro_batch_size, bool) or not isinstance(self.micro_batch_size, int):
            raise ValueError(
                f"MemoryConfig.micro_batch_size must be an int >= 1, got {self.micro_batch_size!r} "
                f"({type(self.micro_batch_size).__name__})."
            )
        if self.micro_batch_size < 1:
            raise ValueError(f"MemoryConfig.micro_batch_size must be an int >= 1, got {self.micro_batch_size}.")
        if isinstance(self.freeze_rate, bool) or not isinstance(self.freeze_rate, (int, float)):
            raise ValueError(f"MemoryConfig.freeze_rate must be a number in [0, 1], got {self.freeze_rate!r}.")
        if not 0.0 <= float(self.freeze_rate) <= 1.0:
            raise ValueError(f"MemoryConfig.freeze_rate must be in [0, 1], got {self.freeze_rate}.")
        object.__setattr__(self, "freeze_rate", float(self.freeze_rate))
        if isinstance(self.checkpoint_segments, bool) or not isinstance(self.checkpoint_segments, int):
            raise ValueError(
                f"MemoryConfig.checkpoint_segments must be an int >= 0 (0 = off), got {self.checkpoint_segments!r}."
            )
        if self.checkpoint_segments < 0:
            raise ValueError(
                f"MemoryConfig.checkpoint_segments must be an int >= 0 (0 = off), got {self.checkpoint_segments}."
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"MemoryConfig.precision must be one of {list(PRECISIONS)}, got {self.precision!r}.")

    def replace(self, **changes: Any) -> "MemoryConfig":
        """A copy with some fields changed (validated again)."""
        return MemoryConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MemoryConfig got unknown field(s) {unknown}; allowed fields are {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MemoryConfig":
        return cls.from_dict(json.loads(text))

    def short(self) -> str:
        """A compact label for tables and logs, e.g. ``mb8/f0.50/ckpt2/bf16``."""
        return f"mb{self.micro_batch_size}/f{self.freeze_rate:.2f}/ckpt{self.checkpoint_segments}/{self.precision}"

    @classmethod
    def parse(cls, text: str) -> "MemoryConfig":
        """The inverse of `short`, for flags: ``mb8/f0.5/ckpt2/bf16``; every part but ``mb`` may be left out."""
        values: dict[str, Any] = {}
        prefixes = (("mb", "micro_batch_size", int), ("ckpt", "checkpoint_segments", int), ("f", "freeze_rate", float))
        for part in filter(None, text.strip().split("/")):
            if part in PRECISIONS:
                values["precision"] = part
                continue
            match = next(((name, kind, part[len(p):]) for p, name, kind in prefixes if part.startswith(p)), None)
            try:
                if match is None or match[0] in values:
                    raise ValueError
                values[match[0]] = match[1](match[2])
            except ValueError:
                raise ValueError(
                    f"Cannot read {part!r} in the memory configuration {text!r}: expected parts like 'mb8/f0.5/ckpt2/bf16' "
                    f"(micro-batch, freeze rate, checkpoint segments, one of {list(PRECISIONS)}), 'mb' required."
                ) from None
        if "micro_batch_size" not in values:
            raise ValueError(f"The memory configuration {text!r} has no micro-batch size: start it with e.g. 'mb8'.")
        return cls(**values)


GAIN_METRICS = ("auto", "val_accuracy", "entropy", "confidence")
COST_PREDICTORS = ("profile", "fake")
STRATEGIES = ("race", "ucb")
DEFAULT_SEARCH_SHARE = 0.05


@dataclass
class MPOptArguments:
    """How the rule engine chooses the knobs: the memory budget, the search space, the trials and the re-tune rules.

    Parsed by `transformers.HfArgumentParser` next to `TrainingArguments`, so every field is also a flag.
    Search-space fields left as None are derived from the model's blocks and the effective batch at train begin.
    """

    memory_budget_mib: float | None = field(
        default=None,
        metadata={
            "help": "Peak memory the training step may use, in MiB. None: on CUDA the device's total memory; on CPU "
            "no budget (only out-of-memory errors steer the search)."
        },
    )
    safety_margin: float = field(
        default=0.05,
        metadata={"help": "Share of the budget kept free for prediction error and fragmentation; in [0, 0.5)."},
    )
    micro_batch_sizes: list[int] | None = field(
        default=None,
        metadata={"help": "Micro-batch sizes to consider. None: powers of two up to the effective batch, and it."},
    )
    freeze_rates: list[float] | None = field(
        default=None,
        metadata={"help": "Freeze rates to consider, each in [0, 1]. None: 0, 0.25, 0.5, 0.75 (distinct block counts)."},
    )
    checkpoint_segments: list[int] | None = field(
        default=None,
        metadata={"help": "Checkpoint segment counts to consider (0 = off). None: 0, half and all trainable blocks."},
    )
    precisions: list[str] | None = field(
        default=None,
        metadata={"help": f"Precisions to consider, from {list(PRECISIONS)}. None: the run's own precision (fp32, "
                  "or fp16 under TrainingArguments.fp16), plus bf16 on a CUDA device that supports it."},
    )
    cost_predictor: str = field(
        default="profile",
        metadata={"help": f"How a configuration is costed before it runs, one of {list(COST_PREDICTORS)}. 'profile': the "
                  "profiler's memory model, traced on fake tensors and calibrated on <= 3 measured steps, predicts "
                  "peak and step time of every configuration (reused from profile_store). 'fake': one fake-tensor "
                  "step per configuration (exact tensor bytes, no step time, slower on a large space)."},
    )
    profile_store: str | None = field(
        default=None,
        metadata={"help": "Where the profile (fit, measurements, out-of-memory marks) is kept between runs: a SQLite "
                  "file path, a redis:// URL, or 'default' (profiles.sqlite in the user's cache folder). None: "
                  "nothing is kept."},
    )
    trial_steps: int = field(
        default=4, metadata={"help": "Optimizer steps one trial of a configuration lasts before its gain is measured."}
    )
    trial_max_s: float | None = field(
        default=None,
        metadata={"help": "A trial also ends after this many seconds of training, so that a slow candidate's trial "
                  "cannot eat the time budget. None: trials last trial_steps steps."},
    )
    search_share: float | None = field(
        default=DEFAULT_SEARCH_SHARE,
        metadata={"help": "Largest share of the time spent searching: a trial lasts at least (evaluation seconds) x "
                  "(1 - share) / share of training, besides trial_steps; a race is re-run once its cost is this share "
                  "of the time since; and when the time left is known (time_budget_s, or a WallClockLimit callback "
                  "such as the online loop's slot per task), a race whose estimated cost exceeds this share of it "
                  "is not run. In (0, 1); None: trials last trial_steps steps however long an evaluation takes."},
    )
    time_budget_s: float | None = field(
        default=None,
        metadata={"help": "Seconds of training (step time, evaluation excluded) after which training stops; the "
                  "engine also plans its search for them. None: no limit."},
    )
    gain_metric: str = field(
        default="auto",
        metadata={
            "help": f"What a trial's gain is measured on, one of {list(GAIN_METRICS)}. 'val_accuracy' needs labelled "
            "evaluation data; 'entropy' (mean prediction entropy, lower is better) and 'confidence' (mean top "
            "probability) need none. 'auto': val_accuracy when the evaluation data have labels, else entropy."
        },
    )
    strategy: str = field(
        default="race",
        metadata={"help": f"How candidates are compared, one of {list(STRATEGIES)}. 'race': each trains for the same "
                  "seconds from the same weights (host copies of weights, optimizer and scheduler state), the "
                  "winner's end state is kept, and the race is re-run once its cost is search_share of the time "
                  "since. 'ucb': trials follow each other on the running weights, picked by a discounted UCB bandit."},
    )
    significance: float = field(
        default=2.0,
        metadata={"help": "race: how many standard errors of the gain metric a more frozen candidate's lead must exceed "
                  "to be chosen over a less frozen one (>= 0); smaller leads count as ties, won by the least frozen."},
    )
    late_gain: bool = field(
        default=True,
        metadata={"help": "race: measure the metric half-way through each trial too, and judge each candidate by the "
                  "metric it would reach by the race's horizon (a climb that flattens out towards a ceiling is "
                  "projected to stop; the dip of newly unfrozen parameters is not held against them). False: one "
                  "metric per trial, and the gain per second over the whole trial decides."},
    )
    exploration: float = field(
        default=0.5,
        metadata={"help": "UCB exploration weight: how often a challenger is re-measured against the incumbent (>= 0)."},
    )
    discount: float = field(
        default=0.25,
        metadata={"help": "Weight kept by older gain estimates when the search re-opens (drift, periodic re-tune); in [0, 1]."},
    )
    drift_threshold: float | None = field(
        default=0.5,
        metadata={
            "help": "Relative jump of an unsupervised proxy (entropy/confidence) between two measurements that counts "
            "as drift and re-opens the search. None: only task boundaries do."
        },
    )
    retune_every_steps: int = field(
        default=0, metadata={"help": "Re-open the search every this many optimizer steps (0 = never)."}
    )
    bn_min_micro_batch: int = field(
        default=8,
        metadata={
            "help": "For models with BatchNorm, micro-batches smaller than this are excluded (unless the whole "
            "effective batch is smaller): BatchNorm would train on tiny-batch statistics."
        },
    )

    def __post_init__(self) -> None:
        if self.memory_budget_mib is not None and not self.memory_budget_mib > 0:
            raise ValueError(f"MPOptArguments.memory_budget_mib must be > 0 MiB or None, got {self.memory_budget_mib}.")
        if not 0.0 <= self.safety_margin < 0.5:
            raise ValueError(f"MPOptArguments.safety_margin must be in [0, 0.5), got {self.safety_margin}.")
        self._check_list("micro_batch_sizes", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                         "ints >= 1")
        self._check_list("freeze_rates", lambda v: isinstance(v, (int, float)) and 0.0 <= v <= 1.0, "numbers in [0, 1]")
        self._check_list("checkpoint_segments", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                         "ints >= 0")
        self._check_list("precisions", lambda v: v in PRECISIONS, f"values from {list(PRECISIONS)}")
        if self.gain_metric not in GAIN_METRICS:
            raise ValueError(f"MPOptArguments.gain_metric must be one of {list(GAIN_METRICS)}, got {self.gain_metric!r}.")
        if self.cost_predictor not in COST_PREDICTORS:
            raise ValueError(
                f"MPOptArguments.cost_predictor must be one of {list(COST_PREDICTORS)}, got {self.cost_predictor!r}."
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"MPOptArguments.strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}.")
        if self.trial_steps < 1:
            raise ValueError(f"MPOptArguments.trial_steps must be an int >= 1, got {self.trial_steps}.")
        if self.trial_max_s is not None and not self.trial_max_s > 0:
            raise ValueError(f"MPOptArguments.trial_max_s must be > 0 seconds or None, got {self.trial_max_s}.")
        if self.search_share is not None and not 0.0 < self.search_share < 1.0:
            raise ValueError(f"MPOptArguments.search_share must be in (0, 1) or None, got {self.search_share}.")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"MPOptArguments.time_budget_s must be > 0 seconds or None, got {self.time_budget_s}.")
        if self.significance < 0:
            raise ValueError(f"MPOptArguments.significance must be >= 0, got {self.significance}.")
        if self.exploration < 0:
            raise ValueError(f"MPOptArguments.exploration must be >= 0, got {self.exploration}.")
        if not 0.0 <= self.discount <= 1.0:
            raise ValueError(f"MPOptArguments.discount must be in [0, 1], got {self.discount}.")
        if self.drift_threshold is not None and not self.drift_threshold > 0:
            raise ValueError(f"MPOptArguments.drift_threshold must be > 0 or None, got {self.drift_threshold}.")
        if self.retune_every_steps < 0:
            raise ValueError(f"MPOptArguments.retune_every_steps must be >= 0 (0 = never), got {self.retune_every_steps}.")
        if self.bn_min_micro_batch < 1:
            raise ValueError(f"MPOptArguments.bn_min_micro_batch must be >= 1, got {self.bn_min_micro_batch}.")

    def _check_list(self, name: str, ok: Any, allowed: str) -> None:
        values = getattr(self, name)
        if values is None:
            return
        if len(values) == 0:
            raise ValueError(f"MPOptArguments.{name} is empty: give at least one of {allowed}, or None for the default.")
        bad = [v for v in values if not ok(v)]
        if bad:
            raise ValueError(f"MPOptArguments.{name} holds {bad}; allowed: {allowed}.")
