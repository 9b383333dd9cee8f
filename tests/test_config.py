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
