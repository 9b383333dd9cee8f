import json

import pytest

from mpopt_hf import MemoryConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(micro_batch_size=0), "micro_batch_size"),
        (dict(micro_batch_size=2.5), "micro_batch_size"),
        (dict(micro_batch_size=4, freeze_rate=1.5), "freeze_rate"),
        (dict(micro_batch_size=4, freeze_rate=-0.1), "freeze_rate"),
        (dict(micro_batch_size=4, checkpoint_segments=-1), "checkpoint_segments"),
        (dict(micro_batch_size=4, precision="fp8"), "precision"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"MemoryConfig\.{field}"):
        MemoryConfig(**kwargs)


def test_precision_error_lists_allowed_values():
    with pytest.raises(ValueError, match=r"\['fp32', 'bf16', 'fp16'\].*'fp8'"):
        MemoryConfig(micro_batch_size=4, precision="fp8")


def test_frozen_hashable_and_json_round_trip():
    cfg = MemoryConfig(micro_batch_size=8, freeze_rate=0.5, checkpoint_segments=2, precision="bf16")
    assert {cfg: 1}[MemoryConfig(8, 0.5, 2, "bf16")] == 1
    with pytest.raises(AttributeError):
        cfg.micro_batch_size = 2  # type: ignore[misc]
    assert MemoryConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["precision"] == "bf16"
    assert cfg.replace(micro_batch_size=2).micro_batch_size == 2


def test_from_dict_refuses_unknown_fields():
    with pytest.raises(ValueError, match="unknown field.*'segments'"):
        MemoryConfig.from_dict({"micro_batch_size": 2, "segments": 3})


def test_freeze_rate_int_is_normalised():
    assert MemoryConfig(micro_batch_size=1, freeze_rate=1).freeze_rate == 1.0


def test_numbers_are_normalised_and_numpy_scalars_accepted():
    import numpy as np

    cfg = MemoryConfig(micro_batch_size=np.int64(8), freeze_rate=np.float32(0.5), checkpoint_segments=np.int32(1))
    assert cfg == MemoryConfig(8, 0.5, 1) and type(cfg.micro_batch_size) is int and type(cfg.freeze_rate) is float
    assert MemoryConfig.parse("mb8/f0.5/ckpt1") == cfg


def test_type_errors_are_type_and_value_errors():
    from mpopt_hf.config import InvalidTypeError

    with pytest.raises(TypeError, match=r"MemoryConfig\.micro_batch_size must be an int >= 1, got True \(bool\)"):
        MemoryConfig(micro_batch_size=True)
    assert issubclass(InvalidTypeError, ValueError)  # callers catching a configuration's ValueError still catch it


def test_parse_refuses_a_repeated_part():
    for text, what in [("mb8/bf16/fp32", "two precisions"), ("mb8/f0.5/f0.25", "'f0.25'"), ("mb8/mb4", "'mb4'")]:
        with pytest.raises(ValueError, match=what):
            MemoryConfig.parse(text)


def test_mpopt_arguments_lists_may_be_tuples_and_numbers_ints():
    from mpopt_hf.config import MPOptArguments

    args = MPOptArguments(memory_budget_mib=512, micro_batch_sizes=(8, 4), freeze_rates=(0, 0.5), significance=1)
    assert args.micro_batch_sizes == [8, 4] and args.freeze_rates == [0.0, 0.5]
    assert args.memory_budget_mib == 512.0 and args.significance == 1.0


def test_mpopt_arguments_still_parse_with_hf_argument_parser():
    """HfArgumentParser builds every field from its type: lists (nargs), optional floats, bools and their --no_ form."""
    from transformers import HfArgumentParser

    from mpopt_hf.config import MPOptArguments

    parser = HfArgumentParser(MPOptArguments)
    (defaults,) = parser.parse_args_into_dataclasses([])
    assert defaults == MPOptArguments()
    (args,) = parser.parse_args_into_dataclasses([
        "--memory_budget_mib", "512.5", "--micro_batch_sizes", "8", "4", "--freeze_rates", "0", "0.5",
        "--checkpoint_segments", "0", "2", "--precisions", "fp32", "bf16", "--trial_max_s", "1.5",
        "--search_share", "0.1", "--time_budget_s", "60", "--drift_threshold", "0.3", "--trial_steps", "2",
        "--late_gain", "false", "--strategy", "ucb", "--profile_store", "default",
    ])
    assert args.memory_budget_mib == 512.5 and args.micro_batch_sizes == [8, 4] and args.freeze_rates == [0.0, 0.5]
    assert args.checkpoint_segments == [0, 2] and args.precisions == ["fp32", "bf16"]
    assert (args.trial_max_s, args.search_share, args.time_budget_s, args.drift_threshold) == (1.5, 0.1, 60.0, 0.3)
    assert args.trial_steps == 2 and args.late_gain is False and args.strategy == "ucb"
    assert args.profile_store == "default"
    (args,) = parser.parse_args_into_dataclasses(["--no_late_gain"])
    assert args.late_gain is False
    (args,) = parser.parse_dict({"memory_budget_mib": 256, "micro_batch_sizes": [16], "late_gain": True})
    assert args.memory_budget_mib == 256.0 and args.micro_batch_sizes == [16]
    with pytest.raises(ValueError, match=r"MPOptArguments\.significance must be a finite number >= 0, got nan"):
        parser.parse_args_into_dataclasses(["--significance", "nan"])
