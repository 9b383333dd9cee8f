"""The knobs refuse FSDP and DeepSpeed at setup with an error that names the field; without knobs the trainer is
left to the engine (issue 16: until the knobs are built for sharded gradients)."""

import os
import subprocess
from pathlib import Path

import pytest
from processes import torchrun_two

from mpopt_hf.training.sharding import refuse_sharded_engines, sharded_engine

SCRIPT = Path(__file__).with_name("dist_sharding_refusal.py")


class FakeTrainer:  # the attributes transformers' Trainer sets, without building an accelerator for an engine
    def __init__(self, fsdp=None, deepspeed=None, fsdp_on=False, deepspeed_on=False):
        self.args = type("Args", (), {"fsdp": fsdp or [], "deepspeed": deepspeed})()
        self.is_fsdp_enabled, self.is_deepspeed_enabled = fsdp_on, deepspeed_on


@pytest.mark.parametrize("trainer, engine, field", [
    (FakeTrainer(fsdp=["full_shard"]), "fsdp", "TrainingArguments.fsdp=['full_shard']"),
    (FakeTrainer(fsdp_on=True), "fsdp", "FSDP (turned on by the accelerate config)"),
    (FakeTrainer(deepspeed="ds_config.json"), "deepspeed", "TrainingArguments.deepspeed='ds_config.json'"),
    (FakeTrainer(deepspeed_on=True), "deepspeed", "DeepSpeed (turned on by the accelerate config)"),
])
def test_a_sharded_engine_is_refused_naming_the_field_and_the_way_out(trainer, engine, field):
    assert sharded_engine(trainer) == engine
    with pytest.raises(ValueError, match="do not run under") as err:
        refuse_sharded_engines(trainer)
    assert field in str(err.value) and "DDP" in str(err.value) and "plain Trainer" in str(err.value)


def test_ddp_and_one_process_pass():
    assert sharded_engine(FakeTrainer()) is None
    refuse_sharded_engines(FakeTrainer())  # no error


def test_mpopt_trainer_refuses_fsdp_in_two_processes_before_the_first_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(torchrun_two(SCRIPT, tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    refusals = {path.name: path.read_text() for path in tmp_path.glob("refused_*.txt")}
    # each rank refused both ways in (memory_config=, an MPOptCallback), and neither hung
    assert sorted(refusals) == [f"refused_{how}_rank{rank}.txt" for how in ("callback", "memory_config")
                                for rank in (0, 1)]
    assert all("TrainingArguments.fsdp=True" in text and "DDP" in text for text in refusals.values())
