"""What ``mpopt profile`` accepts: `ProfileArguments`, one dataclass field per flag, checked in ``__post_init__``.

`transformers.HfArgumentParser` builds the flags from the fields, so the same arguments come from the command line
(``--batch-size 8``, or ``--batch_size 8`` as HfArgumentParser also spells it), from a JSON file
(``HfArgumentParser(ProfileArguments).parse_json_file(path)``) or from Python. A list flag takes comma-separated
values, as it always has (``--micro-batch-sizes 1,2,4``), or space-separated ones as HfArgumentParser's list flags do
(``--micro-batch-sizes 1 2 4``); in JSON or Python it is a list (a comma-separated str is read too).

Every message names the field by its flag (``--budget-mib``), the value and what is allowed. A scalar flag is read
and checked while argparse parses it (`FLAG_TYPES`), so a bad one exits at once with the usage line; lists and checks
across fields raise `ValueError` from ``__post_init__``, which the ``mpopt`` command prints. Both exit with
`EXIT_BAD_INPUT`.
"""

from __future__ import annotations

import numbers
from argparse import ArgumentTypeError
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import (
    DEFAULT_SAFETY_MARGIN,
    CHECKPOINT_POLICIES,
    OPTIMIZER_STATES,
    PRECISIONS,
    InvalidTypeError,
    check_bool,
    check_int,
    check_number,
    check_str,
)

EXIT_BAD_INPUT = 2
EXIT_BUDGET_TOO_SMALL = 3
DEFAULT_FREEZE_RATES = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_CHECKPOINT_SEGMENTS = (0, 1, 2, 4)  # counts above the trainable blocks are skipped
SHAPE_EXAMPLE = "3,32,32 (image C,H,W) or 128 (text sequence length)"


class UsageError(ValueError):
    """Bad command-line input found while the command runs (a model, a shape that does not fit it, a device)."""


def flag(name: str) -> str:
    """The flag of the field ``name``: ``budget_mib`` -> ``--budget-mib``."""
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- scalar fields


@dataclass(frozen=True)
class Accepts:
    """What one scalar field accepts: ``read`` turns a flag's text into a value (int, float, or a str normaliser),
    ``ok`` says whether the value is allowed, ``allowed`` says so in words."""

    read: Callable[[str], Any]
    ok: Callable[[Any], bool]
    allowed: str
    optional: bool = False  # None is allowed (the flag's default)

    def check(self, where: str, value: Any) -> Any:
        """``value`` checked, and normalised, as the field's value (from Python, a JSON file or the flag)."""
        if self.read is int:
            return check_int(where, value, self.ok, self.allowed, self.optional)
        if self.read is float:
            return check_number(where, value, self.ok, self.allowed, self.optional)
        text = check_str(where, value, self.allowed, self.optional)
        normal = None if text is None else self.read(text)
        if normal is not None and not self.ok(normal):
            raise ValueError(f"{where} must be {self.allowed}, got {value!r}.")
        return normal

    def flag_type(self, where: str) -> Callable[[str], Any]:
        """The flag's argparse ``type``: its text read and checked; a refusal quotes the text as it was typed."""

        def parse(text: str) -> Any:
            try:
                return self.check(where, self.read(text))
            except ValueError:  # unreadable, or refused by check (InvalidTypeError is a ValueError too)
                raise ArgumentTypeError(f"{where} must be {self.allowed}, got {text!r}") from None

        return parse


def _is_device(value: str) -> bool:
    kind, colon, index = value.partition(":")
    return value == "cpu" or (kind == "cuda" and (not colon or (index.isdigit() and index.isascii())))


SCALARS: dict[str, Accepts] = {
    "batch_size": Accepts(int, lambda v: v >= 1, "an integer >= 1"),
    "budget_mib": Accepts(float, lambda v: v > 0, "a positive number of MiB", optional=True),
    "safety_margin": Accepts(float, lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    "measure": Accepts(int, lambda v: v >= 0, "an integer >= 0"),
    "fit_measurements": Accepts(int, lambda v: 0 <= v <= 3, "an integer in 0..3"),
    "steps": Accepts(int, lambda v: v >= 1, "an integer >= 1"),
    "store": Accepts(str, lambda v: True, "a SQLite path or a redis:// URL", optional=True),
    # whether that device exists is checked when the command runs
    "device": Accepts(lambda text: text.strip().lower(), _is_device,
                      "one of cpu, cuda, cuda:N (N a CUDA device index)"),
}
device_arg = SCALARS["device"].flag_type("--device")


# ----------------------------------------------------------------------------- list fields


def _read_item(item: Any, read: Callable[[str], Any]) -> list:
    """One item of a list field: a word of the flag (``1,2,4``: several values), or a number from JSON or Python."""
    if isinstance(item, str):
        return [read(part.strip()) for part in item.split(",")]
    if read is str or isinstance(item, bool) or not isinstance(item, numbers.Real) \
            or (read is int and not isinstance(item, numbers.Integral)):
        raise ValueError(item)
    return [read(item)]


def read_list(where: str, value: Any, read: Callable[[str], Any], what: str, example: str,
              ok: Callable[[Any], bool] = lambda v: True) -> tuple[list, str]:
    """The values of a list field, and the text they were given as (for messages).

    ``value`` is a list (JSON, Python), a comma-separated str, or a list of those (the flag's words:
    ``1,2,4`` or ``1 2 4``). Items that ``read`` cannot read, or for which ``ok`` fails, are refused."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise InvalidTypeError(f"{where} must be a list of {what} (or a comma-separated str such as {example}), "
                               f"got {value!r} ({type(value).__name__}).")
    text = ",".join(str(item) for item in items)
    try:
        values = [v for item in items for v in _read_item(item, read)]
    except ValueError:
        values = []
    if not values or not all(ok(v) for v in values):
        raise ValueError(f"{where} must be comma-separated {what} such as {example}; got {text!r}.")
    return values, text


def parse_input_shape(value: Any) -> tuple[int, ...]:
    """``3,32,32`` (image C,H,W) or ``128`` (text sequence length); a list such as [3, 32, 32] too."""
    shape, text = read_list("--input-shape", value, int, "non-negative integers", SHAPE_EXAMPLE, lambda v: v >= 0)
    if any(d == 0 for d in shape) or len(shape) not in (1, 3):
        raise ValueError(f"--input-shape must be C,H,W for images (e.g. 3,32,32) or one sequence length for text "
                         f"(e.g. 128), all positive; got {text!r}.")
    return tuple(shape)


# ----------------------------------------------------------------------------- the arguments


def _help(text: str, metavar: str | None = None) -> dict[str, str]:
    return {"help": text} if metavar is None else {"help": text, "metavar": metavar}


@dataclass
class ProfileArguments:
    """The flags of ``mpopt profile``: the model and its input, the budget, the measurements, the knob space."""

    model: str = field(metadata=_help("small_cnn name (tiny-<name> for a small variant), tiny-vit/tiny-gpt-neo/"
                                      "tiny-clip/tiny-sam/tiny-mobilevit, a local path or a hub id", "NAME"))
    input_shape: list[int] = field(metadata=_help("per-sample shape: C,H,W for images, L for text", "SHAPE"))
    batch_size: int = field(default=32, metadata=_help("effective batch", "N"))
    budget_mib: float | None = field(default=None, metadata=_help("memory budget in MiB", "MIB"))
    safety_margin: float = field(default=DEFAULT_SAFETY_MARGIN, metadata=_help(
        "share of the budget kept free, as the engine keeps it (MPOptArguments.safety_margin): a configuration "
        "fits when its predicted peak is at most budget x (1 - margin)", "X"))
    measure: int = field(default=0, metadata=_help(
        "also measure N configurations (besides the <= 3 the fit uses) and print the error", "N"))
    fit_measurements: int = field(default=3, metadata=_help("measured configurations the fit uses (0..3)", "{0..3}"))
    steps: int = field(default=3, metadata=_help("timed steps per measurement", "N"))
    json: bool = field(default=False, metadata=_help("print a JSON list of rows instead of the table"))
    store: str | None = field(default=None, metadata=_help(
        "profile store: a SQLite path or redis://host:port/db (default: $XDG_CACHE_HOME/mpopt_hf/profiles.sqlite)",
        "PATH"))
    no_store: bool = field(default=False, metadata=_help("neither read nor write a profile store"))
    device: str = field(default="cpu", metadata=_help("cpu, cuda or cuda:N", "DEVICE"))
    precisions: list[str] | None = field(default=None, metadata=_help(
        "list of fp32,bf16,fp16 (default: all the device has)", "LIST"))
    micro_batch_sizes: list[int] | None = field(default=None, metadata=_help(
        "list (default: powers of two up to the batch)", "LIST"))
    freeze_rates: list[float] | None = field(default=None, metadata=_help(
        "list in [0, 1] (default: 0,0.25,0.5,0.75,1)", "LIST"))
    checkpoint_segments: list[int] | None = field(default=None, metadata=_help(
        "list (default: 0,1,2,4; at most the model's blocks)", "LIST"))
    checkpoint_policies: list[str] | None = field(default=None, metadata=_help(
        "list of block,selective: how checkpointed blocks recompute (default: block)", "LIST"))
    optimizer_states: list[str] | None = field(default=None, metadata=_help(
        "list of fp32,8bit: AdamW's moments (8bit: bitsandbytes' blockwise AdamW; default: fp32)", "LIST"))
    lora_ranks: list[int] | None = field(default=None, metadata=_help(
        "list of LoRA ranks, 0 = no adapters (peft's, on the trainable blocks' Linear layers; each priced by a "
        "fake-tensor step; default: 0)", "LIST"))

    def __post_init__(self) -> None:
        # Type errors raise InvalidTypeError (a TypeError and a ValueError), the others ValueError; each message names
        # the flag, the value and what is allowed. Checks that need the model (blocks, shape) run in the command.
        self.model = check_str("--model", self.model, "a model name, a local directory or a hub id")
        self.input_shape = list(parse_input_shape(self.input_shape))
        for name, accepts in SCALARS.items():
            setattr(self, name, accepts.check(flag(name), getattr(self, name)))
        check_bool("--json", self.json)
        check_bool("--no-store", self.no_store)
        if self.no_store and self.store is not None:
            raise ValueError(f"--store {self.store!r} and --no-store exclude each other; give one of them.")
        self._check_precisions()
        self._check_micro_batch_sizes()
        self._check_freeze_rates()
        if self.checkpoint_segments is not None:
            self.checkpoint_segments = read_list("--checkpoint-segments", self.checkpoint_segments, int,
                                                 "non-negative integers", "0,1,2,4", lambda v: v >= 0)[0]
        self.checkpoint_policies = _choices("--checkpoint-policies", self.checkpoint_policies, CHECKPOINT_POLICIES)
        self.optimizer_states = _choices("--optimizer-states", self.optimizer_states, OPTIMIZER_STATES)
        if self.lora_ranks is not None:
            self.lora_ranks = read_list("--lora-ranks", self.lora_ranks, int, "non-negative integers", "0,8",
                                        lambda v: v >= 0)[0]

    @property
    def device_type(self) -> str:
        """``cpu`` or ``cuda``."""
        return self.device.partition(":")[0]

    def _check_precisions(self) -> None:
        if self.precisions is None:
            return
        self.precisions, text = read_list("--precisions", self.precisions, str, f"values from {list(PRECISIONS)}",
                                          "fp32,bf16")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise ValueError(f"--precisions {bad} unknown (in {text!r}); accepted: {list(PRECISIONS)}.")
        if "fp16" in self.precisions and self.device_type != "cuda":
            raise ValueError("--precisions fp16 needs --device cuda; use fp32,bf16 on CPU.")

    def _check_micro_batch_sizes(self) -> None:
        if self.micro_batch_sizes is None:
            return
        self.micro_batch_sizes, text = read_list("--micro-batch-sizes", self.micro_batch_sizes, int,
                                                 "non-negative integers", "1,2,4,8", lambda v: v >= 0)
        outside = [m for m in self.micro_batch_sizes if not 1 <= m <= self.batch_size]
        if outside:
            raise ValueError(f"--micro-batch-sizes {text!r}: each micro-batch size must be in 1..{self.batch_size} "
                             f"(the --batch-size); got {outside}.")

    def _check_freeze_rates(self) -> None:
        if self.freeze_rates is None:
            return
        self.freeze_rates, text = read_list("--freeze-rates", self.freeze_rates, float, "numbers in [0, 1]",
                                            "0,0.5,1")
        bad = [x for x in self.freeze_rates if not 0.0 <= x <= 1.0]  # NaN fails this too
        if bad:
            raise ValueError(f"--freeze-rates {text!r}: each freeze_rate must be in [0, 1]; got {bad}.")


def _choices(name: str, values: list[str] | None, allowed: tuple[str, ...]) -> list[str] | None:
    """A comma-separated list of words, each one of ``allowed``."""
    if values is None:
        return None
    values, text = read_list(name, values, str, f"values from {list(allowed)}", ",".join(allowed))
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{name} {bad} unknown (in {text!r}); accepted: {list(allowed)}.")
    return values


# each flag's argparse type: scalars read and checked by `Accepts`; list items kept as words for __post_init__
FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    **{name: accepts.flag_type(flag(name)) for name, accepts in SCALARS.items()},
    **{name: str for name in ("input_shape", "precisions", "micro_batch_sizes", "freeze_rates", "checkpoint_segments",
                                     "checkpoint_policies", "optimizer_states", "lora_ranks")},
}
