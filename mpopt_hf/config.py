"""One point of the memory-knob space.

A `MemoryConfig` says *how* a training step is run, never *what* is learned: two
configurations that differ only in their knobs give the same gradient for the
same effective batch (up to floating point), but different peak memory and
step time. That is what lets the engine switch between them online.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
# How a checkpointed block saves for backward: "block" keeps only its input and recomputes everything;
# "selective" also keeps the outputs of its matmuls, convolutions and attention (the costly ops) and
# recomputes the cheap rest, so it sits between no checkpointing and whole-block checkpointing.
CHECKPOINT_POLICIES = ("block", "selective")
# How AdamW holds its two moments: 32-bit floats, or bitsandbytes' blockwise 8 bits (`optimizer_state`).
OPTIMIZER_STATES = ("fp32", "8bit")


from .validation import (  # noqa: F401  (re-exported: the recipes and the CLI import the checks from here)
    InvalidTypeError,
    _got,
    check_bool,
    check_choice,
    check_int,
    check_list,
    check_number,
    check_str,
    is_int,
    is_number,
)


def check_budget(where: str, value: Any) -> float | str | Callable[[], float] | None:
    """A memory budget: None, a finite number of MiB > 0 (also as a string, from a flag), 'auto' or a callable."""
    if value is None or value == "auto" or callable(value):
        return value
    allowed = "> 0 MiB (a finite number), 'auto', a callable returning bytes, or None"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{where} must be {allowed}, got {value!r}.") from None
    return check_number(where, value, lambda v: v > 0, allowed)


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
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Samples per optimizer update (per device), when smaller than the loader's batch: each "
                  "loader batch is then split into updates of this many samples, every sample used once. Unlike the "
                  "other knobs it changes what is learned (opt in through MPOptArguments.effective_batch_sizes). "
                  "None: the loader's batch."},
    )

    checkpoint_policy: str = field(
        default="block",
        metadata={"help": f"How the checkpointed blocks recompute, one of {CHECKPOINT_POLICIES}: 'block' keeps only "
                  "each block's input; 'selective' also keeps its matmul, convolution and attention outputs and "
                  "recomputes the rest (more memory than 'block', less recomputation). Only matters with "
                  "checkpoint_segments > 0."},
    )
    optimizer_state: str = field(
        default="fp32",
        metadata={"help": f"How AdamW keeps its moments, one of {OPTIMIZER_STATES}: '8bit' holds them in "
                  "bitsandbytes' blockwise 8 bits (about 2 instead of 8 bytes per trained parameter; tensors under "
                  "4096 elements stay 32-bit), converted in place when switched, so the moments are kept. Needs "
                  "bitsandbytes and torch's AdamW. Label part: 'opt8'."},
    )

    def __post_init__(self) -> None:
        # type errors raise InvalidTypeError (a TypeError and a ValueError), range errors ValueError
        set_ = object.__setattr__  # frozen: normalise through object.__setattr__ (numpy ints -> int, ints -> float)
        set_(self, "micro_batch_size",
             check_int("MemoryConfig.micro_batch_size", self.micro_batch_size, lambda v: v >= 1, "an int >= 1"))
        set_(self, "freeze_rate",
             check_number("MemoryConfig.freeze_rate", self.freeze_rate, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"))
        set_(self, "checkpoint_segments", check_int("MemoryConfig.checkpoint_segments", self.checkpoint_segments,
                                                    lambda v: v >= 0, "an int >= 0 (0 = off)"))
        check_choice("MemoryConfig.precision", self.precision, PRECISIONS)
        set_(self, "batch_size", check_int("MemoryConfig.batch_size", self.batch_size, lambda v: v >= 1,
                                           "an int >= 1 or None", optional=True))
        check_choice("MemoryConfig.checkpoint_policy", self.checkpoint_policy, CHECKPOINT_POLICIES)
        if self.checkpoint_segments == 0:  # nothing checkpointed: the policy is moot, and one such config is enough
            set_(self, "checkpoint_policy", "block")
        check_choice("MemoryConfig.optimizer_state", self.optimizer_state, OPTIMIZER_STATES)

    def replace(self, **changes: Any) -> "MemoryConfig":
        """A copy with some fields changed (validated again)."""
        return MemoryConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryConfig":
        known = {f.name for f in fields(cls)}
        if not isinstance(data, Mapping):
            raise InvalidTypeError(f"MemoryConfig.from_dict expects a dict of the fields {sorted(known)}, "
                                   f"got {_got(data)}.")
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
        policy = "s" if self.checkpoint_policy == "selective" else ""
        text = f"mb{self.micro_batch_size}/f{self.freeze_rate:.2f}/ckpt{self.checkpoint_segments}{policy}/{self.precision}"
        text += "/opt8" if self.optimizer_state == "8bit" else ""
        return text if self.batch_size is None else f"bs{self.batch_size}/{text}"

    @property
    def selective(self) -> bool:
        """True when some block is checkpointed selectively (the policy is moot without checkpointing)."""
        return self.checkpoint_policy == "selective" and self.checkpoint_segments > 0

    @property
    def step_micro_batch(self) -> int:
        """The micro-batch a step really runs: never more than its update's batch."""
        return self.micro_batch_size if self.batch_size is None else min(self.micro_batch_size, self.batch_size)

    def without_batch(self) -> "MemoryConfig":
        """The same step on the loader's whole batch: what a cost model prices (the batch knob adds only
        optimizer updates, not memory)."""
        if self.batch_size is None:
            return self
        return self.replace(batch_size=None, micro_batch_size=self.step_micro_batch)

    @classmethod
    def parse(cls, text: str) -> "MemoryConfig":
        """The inverse of `short`, for flags: ``mb8/f0.5/ckpt2/bf16``; every part but ``mb`` may be left out.

        Each part may appear once (``mb8/bf16/fp32`` is refused: two precisions)."""
        if not isinstance(text, str):
            raise InvalidTypeError(f"MemoryConfig.parse expects a str such as 'mb8/f0.5/ckpt2/bf16', got {_got(text)}.")
        values: dict[str, Any] = {}
        prefixes = (("mb", "micro_batch_size", int), ("ckpt", "checkpoint_segments", int), ("bs", "batch_size", int),
                    ("f", "freeze_rate", float))
        for part in filter(None, text.strip().split("/")):
            if part.startswith("ckpt") and part.endswith("s") and "checkpoint_policy" not in values:
                values["checkpoint_policy"], part = "selective", part[:-1]  # 'ckpt2s': two blocks, selectively
            if part in ("opt8", "opt32") and "optimizer_state" not in values:
                values["optimizer_state"] = "8bit" if part == "opt8" else "fp32"
                continue
            if part in PRECISIONS:
                if "precision" in values:
                    raise ValueError(
                        f"The memory configuration {text!r} names two precisions ({values['precision']!r} and "
                        f"{part!r}); give one of {list(PRECISIONS)}."
                    )
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
                    f"(micro-batch, freeze rate, checkpoint segments with an 's' for selective, one of "
                    f"{list(PRECISIONS)}; optionally 'bs16', the batch per update, and 'opt8', 8-bit optimizer "
                    "state), 'mb' required."
                ) from None
        if "micro_batch_size" not in values:
            raise ValueError(f"The memory configuration {text!r} has no micro-batch size: start it with e.g. 'mb8'.")
        try:
            return cls(**values)
        except ValueError as err:  # a part read as a number but out of range, e.g. 'mb0' or 'f1.5'
            raise type(err)(f"In the memory configuration {text!r}: {err}") from None


GAIN_METRICS = ("auto", "val_accuracy", "entropy", "confidence", "loss", "train_loss")
COST_PREDICTORS = ("profile", "fake")
STRATEGIES = ("race", "ucb")
GAIN_UNITS = ("second", "step")  # what a trial's gain is divided by: training seconds, or Trainer steps
LR_SCALINGS = ("none", "linear", "sqrt")
DEFAULT_SEARCH_SHARE = 0.05


@dataclass
class MPOptArguments:
    """How the rule engine chooses the knobs: the memory budget, the search space, the trials and the re-tune rules.

    Parsed by `transformers.HfArgumentParser` next to `TrainingArguments`, so every field is also a flag.
    Search-space fields left as None are derived from the model's blocks and the effective batch at train begin.
    """

    memory_budget_mib: float | str | None = field(
        default=None,
        metadata={
            "help": "Peak memory the training step may use: a number of MiB; 'auto': what this process could hold "
            "now (CUDA: free memory plus what it reserves; CPU: MemAvailable plus its resident set), re-read every "
            "budget_every_steps steps; in Python also a callable returning bytes (e.g. mpopt_hf.BudgetTrace). A "
            "lower budget is applied at the next step boundary, before any out-of-memory error. None: on CUDA the "
            "device's total memory; on CPU no budget (only out-of-memory errors steer the search)."
        },
    )
    budget_every_steps: int = field(
        default=10,
        metadata={"help": "With memory_budget_mib='auto' or a callable: read the budget again every this many "
                  "optimizer steps (>= 1)."},
    )
    safety_margin: float = field(
        default=0.05,
        metadata={"help": "Share of the budget kept free for prediction error and fragmentation; in [0, 0.5)."},
    )
    micro_batch_sizes: list[int] | None = field(
        default=None,
        metadata={"help": "Micro-batch sizes to consider. None: powers of two up to the effective batch, and it."},
    )
    effective_batch_sizes: list[int] | None = field(
        default=None,
        metadata={"help": "Batches per optimizer update the engine may choose (the batch as a knob, opt in): each "
                  "must divide per_device_train_batch_size, which the loader yields; a smaller batch makes several "
                  "updates per Trainer step, each sample used once. None: only the user's batch."},
    )
    lr_scaling: str | None = field(
        default=None,
        metadata={"help": f"How the learning rate follows the batch, one of {list(LR_SCALINGS)}: lr x (batch / "
                  "per_device_train_batch_size), its square root, or unchanged; applied at each optimizer step "
                  "(the scheduler is untouched). None: 'sqrt' when effective_batch_sizes is given."},
    )
    freeze_rates: list[float] | None = field(
        default=None,
        metadata={"help": "Freeze rates to consider, each in [0, 1]. None: 0, 0.25, 0.5, 0.75 (distinct block counts)."},
    )
    checkpoint_segments: list[int] | None = field(
        default=None,
        metadata={"help": "Checkpoint segment counts to consider (0 = off). None: 0, half and all trainable blocks."},
    )
    checkpoint_policies: list[str] = field(
        default_factory=lambda: ["block"],
        metadata={"help": f"How checkpointed blocks recompute, values from {list(CHECKPOINT_POLICIES)}; listing "
                  "'selective' adds, for every segment count > 0, the configuration that keeps the blocks' matmul "
                  "outputs (between no checkpointing and 'block' in memory and in time). Default: 'block' only."},
    )
    optimizer_states: list[str] = field(
        default_factory=lambda: ["fp32"],
        metadata={"help": f"Optimizer states to consider, values from {list(OPTIMIZER_STATES)}; listing '8bit' "
                  "makes the trainer build bitsandbytes' AdamW (in 32 bits until a configuration asks for 8) and "
                  "adds every configuration with 8-bit moments. Default: 'fp32' only."},
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
            "probability) need none; 'loss': the model's own loss on the evaluation data (lower is better), for "
            "models without classification logits (CLIP, causal LMs, SAM); 'train_loss': the training loss the steps "
            "compute anyway (no evaluation data, no extra forward pass; MPOptTrainer only). 'auto': without "
            "evaluation data train_loss; with them, for an output with classification logits val_accuracy when the "
            "evaluation data have labels, else entropy; for any other output, loss."
        },
    )
    strategy: str = field(
        default="race",
        metadata={"help": f"How candidates are compared, one of {list(STRATEGIES)}. 'race': each trains for the same "
                  "seconds from the same weights (host copies of weights, optimizer and scheduler state), the "
                  "winner's end state is kept, and the race is re-run once its cost is search_share of the time "
                  "since. 'ucb': trials follow each other on the running weights, picked by a discounted UCB bandit."},
    )
    gain_per: str = field(
        default="second",
        metadata={"help": f"What a candidate's gain is counted against, one of {list(GAIN_UNITS)}. 'second': "
                  "training time (the run has a fixed time; a faster, more frozen configuration wins when it learns "
                  "more per second). 'step': Trainer steps, i.e. samples (the run has fixed epochs or max_steps: "
                  "a faster configuration wins only if it learns more per step). Among configurations that learn "
                  "the same (same trainable set and batch) the fastest runs either way."},
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
    strict_resume: bool = field(
        default=False,
        metadata={"help": "Resuming from a checkpoint that lacks the engine's state (or whose race snapshot is "
                  "missing) raises instead of warning and restarting the search from scratch."},
    )

    def __post_init__(self) -> None:
        # Every field is checked here, where it enters (HfArgumentParser, a JSON file, or Python): type errors raise
        # InvalidTypeError (a TypeError and a ValueError), range errors ValueError; each names field, value, allowed.
        where = "MPOptArguments."
        positive = lambda v: v > 0
        self.memory_budget_mib = check_budget(where + "memory_budget_mib", self.memory_budget_mib)
        self.budget_every_steps = check_int(where + "budget_every_steps", self.budget_every_steps, lambda v: v >= 1,
                                            "an int >= 1")
        self.safety_margin = check_number(where + "safety_margin", self.safety_margin, lambda v: 0.0 <= v < 0.5,
                                          "in [0, 0.5)")
        self.micro_batch_sizes = check_list(where + "micro_batch_sizes", self.micro_batch_sizes,
                                            lambda v: is_int(v) and v >= 1, "ints >= 1", optional=True)
        self.effective_batch_sizes = check_list(where + "effective_batch_sizes", self.effective_batch_sizes,
                                                lambda v: is_int(v) and v >= 1, "ints >= 1", optional=True)
        if self.effective_batch_sizes is not None:
            self.effective_batch_sizes = sorted({int(v) for v in self.effective_batch_sizes}, reverse=True)
        check_choice(where + "lr_scaling", self.lr_scaling, LR_SCALINGS, optional=True)
        if self.lr_scaling is None and self.effective_batch_sizes is not None:
            self.lr_scaling = "sqrt"
        self.freeze_rates = check_list(where + "freeze_rates", self.freeze_rates,
                                       lambda v: is_number(v) and 0.0 <= v <= 1.0, "numbers in [0, 1]", optional=True)
        self.checkpoint_segments = check_list(where + "checkpoint_segments", self.checkpoint_segments,
                                              lambda v: is_int(v) and v >= 0, "ints >= 0", optional=True)
        self.checkpoint_policies = check_list(where + "checkpoint_policies", self.checkpoint_policies,
                                              lambda v: isinstance(v, str) and v in CHECKPOINT_POLICIES,
                                              f"values from {list(CHECKPOINT_POLICIES)}")
        self.checkpoint_policies = list(dict.fromkeys(self.checkpoint_policies))
        self.optimizer_states = list(dict.fromkeys(check_list(
            where + "optimizer_states", self.optimizer_states, lambda v: isinstance(v, str) and v in OPTIMIZER_STATES,
            f"values from {list(OPTIMIZER_STATES)}")))
        self.precisions = check_list(where + "precisions", self.precisions,
                                     lambda v: isinstance(v, str) and v in PRECISIONS,
                                     f"values from {list(PRECISIONS)}", optional=True)
        if self.micro_batch_sizes is not None:
            self.micro_batch_sizes = [int(v) for v in self.micro_batch_sizes]
        if self.freeze_rates is not None:
            self.freeze_rates = [float(v) for v in self.freeze_rates]
        if self.checkpoint_segments is not None:
            self.checkpoint_segments = [int(v) for v in self.checkpoint_segments]
        check_choice(where + "cost_predictor", self.cost_predictor, COST_PREDICTORS)
        check_str(where + "profile_store", self.profile_store,
                  "a SQLite file path, a redis:// URL, 'default' or None", optional=True)
        self.trial_steps = check_int(where + "trial_steps", self.trial_steps, lambda v: v >= 1, "an int >= 1")
        self.trial_max_s = check_number(where + "trial_max_s", self.trial_max_s, positive,
                                        "> 0 seconds (a finite number) or None", optional=True)
        self.search_share = check_number(where + "search_share", self.search_share, lambda v: 0.0 < v < 1.0,
                                         "in (0, 1) or None", optional=True)
        self.time_budget_s = check_number(where + "time_budget_s", self.time_budget_s, positive,
                                          "> 0 seconds (a finite number) or None", optional=True)
        check_choice(where + "gain_metric", self.gain_metric, GAIN_METRICS)
        check_choice(where + "strategy", self.strategy, STRATEGIES)
        check_choice(where + "gain_per", self.gain_per, GAIN_UNITS)
        self.significance = check_number(where + "significance", self.significance, lambda v: v >= 0,
                                         "a finite number >= 0")
        check_bool(where + "late_gain", self.late_gain)
        self.exploration = check_number(where + "exploration", self.exploration, lambda v: v >= 0,
                                        "a finite number >= 0")
        self.discount = check_number(where + "discount", self.discount, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        self.drift_threshold = check_number(where + "drift_threshold", self.drift_threshold, positive,
                                            "> 0 (a finite number) or None", optional=True)
        self.retune_every_steps = check_int(where + "retune_every_steps", self.retune_every_steps, lambda v: v >= 0,
                                            "an int >= 0 (0 = never)")
        self.bn_min_micro_batch = check_int(where + "bn_min_micro_batch", self.bn_min_micro_batch, lambda v: v >= 1,
                                            "an int >= 1")
        check_bool(where + "strict_resume", self.strict_resume)
