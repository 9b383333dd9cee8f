"""The trainer measures each step's peak on CPU too: sampled MemTracker steps, the race's copies counted."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from mpopt_hf import MemoryConfig, MPOptTrainer
from mpopt_hf.profiler import measure
from mpopt_hf.training.step_peak import StepPeakMeter, process_peak_rss_bytes
from mpopt_hf.testing.tiny_models import build_tiny, example_batch
from trainer_utils import ListDataset, training_args

BATCH = 8


class PeakLog(TrainerCallback):
    def __init__(self, trainer_ref):
        self.trainer_ref, self.peaks = trainer_ref, []

    def on_step_end(self, args, state, control, **kwargs):
        self.peaks.append(self.trainer_ref[0]._step_peak_bytes)


def _run(tmp_path, config, steps, every, held=0, batch=BATCH):
    torch.manual_seed(0)
    model = build_tiny("vit", num_layers=2, dropout=0.0)
    data = ListDataset(example_batch(model, batch * steps))
    ref = []
    log = PeakLog(ref)
    args = training_args(tmp_path, batch, steps=steps, learning_rate=1e-3, weight_decay=0.0)
    trainer = MPOptTrainer(model=model, args=args, train_dataset=data, memory_config=config, callbacks=[log],
                           peak_every_steps=every, log_memory_config=True)
    ref.append(trainer)
    if held:
        trainer.peak_meter.held_bytes.append(lambda: held)
    trainer.train()
    return trainer, log.peaks, model


def test_cpu_step_peak_is_sampled_and_matches_the_profiler(tmp_path):
    config = MemoryConfig(4, 0.0, 1)
    trainer, peaks, model = _run(tmp_path, config, steps=5, every=2)
    # the first step of the configuration and every 2nd after it
    assert [p is not None for p in peaks] == [True, False, True, False, True]
    # the same tensors as the profiler's own measurement of that configuration (MemTracker both): the trainer's
    # step holds a few more scalars (loss sums, item counts), never a tensor of the model's size more
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    batch = example_batch(model, BATCH)
    reference = measure(model, batch, config, optimizer, steps=1, warmup=1).tracked_peak_bytes
    smallest_tensor = min(p.numel() * p.element_size() for p in model.parameters())
    for peak in [p for p in peaks[1:] if p is not None]:  # after the first step the optimizer state exists, as in `measure`
        assert 0 <= peak - reference <= 64 * 1024, (peak, reference)
    assert smallest_tensor > 0
    logged = [row for row in trainer.state.log_history if "peak_memory_mib" in row]
    assert all(row["peak_rss_mib"] >= row["peak_memory_mib"] for row in logged)
    assert trainer.peak_meter.overhead.tracked_steps == 3 and trainer.peak_meter.overhead.plain_steps == 2


def test_bytes_held_outside_the_model_count(tmp_path):
    held = 3 * 2**20
    _, plain, _ = _run(tmp_path / "a", MemoryConfig(8), steps=3, every=1)
    _, with_copy, _ = _run(tmp_path / "b", MemoryConfig(8), steps=3, every=1, held=held)
    assert [b - a for a, b in zip(plain, with_copy)] == [held] * 3  # tensor bytes are deterministic


def test_meter_rejects_a_bad_rate_and_reports_rss():
    with pytest.raises(ValueError, match="every"):
        StepPeakMeter(torch.device("cpu"), every=0)
    assert process_peak_rss_bytes() > 10 * 2**20


@pytest.mark.parametrize("family", ["t5", "convnext", "whisper", "gpt2"])
def test_the_step_peak_matches_the_profiler_on_other_families(tmp_path, family):
    """Encoder-decoder, staged convolutional, speech and decoder-only models with padded token labels: the
    trainer's sampled peak is the profiler's measurement of the same configuration, plus a few scalars."""
    from families import FAMILIES

    spec = FAMILIES[family]
    batch = spec.batch(BATCH, padded=spec.paddable)
    config = MemoryConfig(4, 0.0, 1)
    model = spec.build()
    ref = []
    log = PeakLog(ref)
    args = training_args(tmp_path, BATCH, steps=3, learning_rate=1e-3, weight_decay=0.0)
    trainer = MPOptTrainer(model=model, args=args, train_dataset=ListDataset({k: v.repeat(3, *[1] * (v.dim() - 1))
                                                                               for k, v in batch.items()}),
                           memory_config=config, callbacks=[log], peak_every_steps=2)
    ref.append(trainer)
    trainer.train()
    assert [p is not None for p in log.peaks] == [True, False, True]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    reference = measure(model, batch, config, optimizer, steps=1, warmup=1).tracked_peak_bytes
    assert 0 <= log.peaks[2] - reference <= 64 * 1024, (family, log.peaks[2], reference)


def test_a_micro_batched_step_never_measures_more_than_the_whole_batch(tmp_path):
    """Same batch, same model: splitting it holds fewer activations at once, on every step, the first included; so
    whatever the trainer adds to its first split step must fit what that configuration was predicted to hold."""
    steps = 2
    _, whole, _ = _run(tmp_path / "whole", MemoryConfig(4), steps=steps, every=1, batch=4)
    _, split, _ = _run(tmp_path / "split", MemoryConfig(1), steps=steps, every=1, batch=4)
    assert split[1] <= whole[1]  # a later step: the check has run, nothing else differs
    assert split[0] <= whole[0], (split, whole)
