"""`MPOptArguments`: how the rule engine chooses the knobs, as a dataclass that `transformers.HfArgumentParser`
parses next to `TrainingArguments`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .memory import CHECKPOINT_POLICIES, OPTIMIZER_STATES, PRECISIONS, check_budget
from .validation import (
    check_bool,
    check_choice,
    check_int,
    check_list,
    check_number,
    check_str,
    is_int,
    is_number,
)

GAIN_METRICS = ("auto", "val_accuracy", "entropy", "confidence", "loss", "train_loss")
COST_PREDICTORS = ("profile", "fake")
STRATEGIES = ("race", "ucb", "fixed", "halving")  # the last two compare nothing: baselines in the same machinery
GAIN_UNITS = ("second", "step")  # what a trial's gain is divided by: training seconds, or Trainer steps
LR_SCALINGS = ("none", "linear", "sqrt")
DEFAULT_SEARCH_SHARE = 0.05
DEFAULT_SAFETY_MARGIN = 0.05  # MPOptArguments.safety_margin's default, also `mpopt profile --safety-margin`'s


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
        default=DEFAULT_SAFETY_MARGIN,
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
    lora_ranks: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "LoRA ranks to consider (MemoryConfig.lora_rank, opt in: adapters change what is learned); "
                  "0 is full training of the trainable blocks. Listing a rank > 0 adds every configuration with "
                  "adapters of that rank, each costed by one fake-tensor step (the profiled memory model does not trace "
                  "adapters yet). Default: 0 only."},
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
                  "since. 'ucb': trials follow each other on the running weights, picked by a discounted UCB bandit. "
                  "'fixed' and 'halving' compare nothing (baselines through the same machinery): the first candidate "
                  "all along, or the largest micro-batch halved after each out-of-memory error, never grown back."},
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
        self.lora_ranks = sorted({int(v) for v in check_list(where + "lora_ranks", self.lora_ranks,
                                                             lambda v: is_int(v) and v >= 0, "ints >= 0")})
        if not self.lora_ranks:
            raise ValueError(f"{where}lora_ranks is empty; give [0] (no adapters) or the ranks to consider.")
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
