import copy

import pytest
import torch
from transformers import TrainerCallback

from mpopt_hf import MemoryConfig, MPOptTrainer
from mpopt_hf.model.blocks import find_blocks
from mpopt_hf.model.knobs import count_trainable_parameters
from mpopt_hf.testing.tiny_models import build_tiny, example_batch
from trainer_utils import ListDataset, plain_trainer_grads, run_steps, training_args

BATCH = 6


def _max_grad_error(got, ref):
    assert got.keys() == ref.keys()
    errors = [0.0]
    for name, expected in ref.items():
        assert (got[name] is None) == (expected is None), name
        if expected is not None:
            errors.append((got[name] - expected).abs().max().item())
    return max(errors)


@pytest.mark.parametrize("family", ["vit", "gpt_neo"])
def test_gradients_equal_a_plain_trainer_step(tmp_path, family):
    base = build_tiny(family, dropout=0.0)
    data = ListDataset(example_batch(base, BATCH))
    reference = plain_trainer_grads(copy.deepcopy(base), data, training_args(tmp_path, BATCH))[0]
    for cfg in (
        MemoryConfig(BATCH),
        MemoryConfig(3),
        MemoryConfig(1),
        MemoryConfig(1, checkpoint_segments=4),
        MemoryConfig(3, checkpoint_segments=2),
        MemoryConfig(4),  # micro-batches of 4 and 2: unequal shares
    ):
        _, capture = run_steps(MPOptTrainer, copy.deepcopy(base), data, training_args(tmp_path, BATCH), memory_config=cfg)
        assert _max_grad_error(capture.grads[0], reference) < 1e-5, cfg


def test_checkpointing_replays_dropout_masks(tmp_path):
    base = build_tiny("vit", dropout=0.3)
    data = ListDataset(example_batch(base, BATCH))
    grads = []
    for cfg in (MemoryConfig(3), MemoryConfig(3, checkpoint_segments=4)):
        _, capture = run_steps(MPOptTrainer, copy.deepcopy(base), data, training_args(tmp_path, BATCH), memory_config=cfg)
        grads.append(capture.grads[0])
    assert _max_grad_error(grads[1], grads[0]) < 1e-6
    # the masks are really there: a different seed gives other gradients
    _, other = run_steps(
        MPOptTrainer, copy.deepcopy(base), data, training_args(tmp_path, BATCH, seed=1), memory_config=MemoryConfig(3)
    )
    assert _max_grad_error(other.grads[0], grads[0]) > 1e-4


def test_frozen_parameters_do_not_move(tmp_path):
    model = build_tiny("vit")
    blocks = find_blocks(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen_ids = {id(p) for p in blocks.stem_params()} | {id(p) for i in range(2) for p in blocks.block_params(i)}
    data = ListDataset(example_batch(model, 24))
    trainer, _ = run_steps(
        MPOptTrainer, model, data, training_args(tmp_path, 8, steps=6), memory_config=MemoryConfig(4, freeze_rate=0.5)
    )
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    frozen = {n for n, p in model.named_parameters() if id(p) in frozen_ids}
    assert frozen and not (moved & frozen)  # weight decay (0.1) did not touch them either
    assert moved == set(start) - frozen
    expected = sum(p.numel() for n, p in model.named_parameters() if n not in frozen)
    assert count_trainable_parameters(model) == expected
    # the optimizer still holds the frozen parameters, so a later unfreeze trains them without a rebuild
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert frozen_ids <= held


class _Switcher(TrainerCallback):
    """Switches the memory config at given steps and records the micro-batches each step ran."""

    def __init__(self, schedule):
        self.schedule, self.trainer, self.seen = schedule, None, []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step in self.schedule:
            self.trainer.set_memory_config(self.schedule[state.global_step])


def test_switching_mid_run_keeps_the_effective_batch(tmp_path):
    model = build_tiny("vit")
    data = ListDataset(example_batch(model, 64))
    schedule = {
        0: MemoryConfig(8),
        2: MemoryConfig(2, freeze_rate=0.75),
        4: MemoryConfig(8, freeze_rate=0.25, checkpoint_segments=2),
        6: MemoryConfig(2, checkpoint_segments=2),
    }
    switcher = _Switcher(schedule)
    sizes = []
    trainer = MPOptTrainer(
        model=model, args=training_args(tmp_path, 8, steps=8), train_dataset=data, callbacks=[switcher]
    )
    switcher.trainer = trainer
    model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    trainer.train()
    assert trainer.state.global_step == 8
    # the first split step checks once, on one micro-batch of samples (2) whole and in halves, that the loss does
    # not couple the batch
    coupling_check = [2, 1, 1]
    assert sizes == [8, 8] + coupling_check + [2] * 8 + [8, 8] + [2] * 8
    assert trainer.memory_config == schedule[6]


def test_bad_arguments_name_the_field(tmp_path):
    model = build_tiny("vit")
    data = ListDataset(example_batch(model, 8))
    with pytest.raises(ValueError, match=r"MemoryConfig.precision='fp32' while TrainingArguments.bf16=True"):
        MPOptTrainer(model=model, args=training_args(tmp_path, 8, bf16=True), train_dataset=data,
                     memory_config=MemoryConfig(4))
    trainer = MPOptTrainer(model=model, args=training_args(tmp_path, 8), train_dataset=data)
    with pytest.raises(ValueError, match=r"precision='fp16' needs TrainingArguments\(fp16=True\)"):
        trainer.set_memory_config(MemoryConfig(4, precision="fp16"))
    with pytest.raises(ValueError, match=r"checkpoint_segments=9 exceeds the 4 trainable blocks"):
        trainer.set_memory_config(MemoryConfig(4, checkpoint_segments=9))
    with pytest.raises(ValueError, match="must be a MemoryConfig"):
        trainer.set_memory_config({"micro_batch_size": 2})


def test_bf16_trains_on_cpu_and_logs_the_config(tmp_path):
    model = build_tiny("gpt_neo")
    data = ListDataset(example_batch(model, 16))
    logged = []

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs))

    trainer, _ = run_steps(
        MPOptTrainer,
        model,
        data,
        training_args(tmp_path, 8, steps=2, logging_strategy="steps", logging_steps=1),
        callbacks=[Logs()],
        memory_config=MemoryConfig(4, precision="bf16", checkpoint_segments=2),
        log_memory_config=True,
    )
    step_logs = [entry for entry in logged if "loss" in entry]
    assert len(step_logs) == 2 and step_logs[0]["micro_batch_size"] == 4
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in step_logs)


def test_default_config_is_a_plain_trainer(tmp_path):
    base = build_tiny("vit", dropout=0.0)
    data = ListDataset(example_batch(base, BATCH))
    reference = plain_trainer_grads(copy.deepcopy(base), data, training_args(tmp_path, BATCH))[0]
    trainer, capture = run_steps(MPOptTrainer, copy.deepcopy(base), data, training_args(tmp_path, BATCH))
    assert trainer.memory_config == MemoryConfig(BATCH)
    assert _max_grad_error(capture.grads[0], reference) == 0.0
