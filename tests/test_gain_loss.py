"""The gain metric for models without classification logits: their own loss on the evaluation data.

A contrastive CLIP (``CLIPOutput`` has no ``logits``), a causal LM with padded labels and SAM train under
``MPOptTrainer(..., mpopt_args=MPOptArguments())`` with an eval set; 'auto' resolves to what the output holds, and
an explicit logit metric on a model that has none is refused naming 'loss'."""

from __future__ import annotations

import math

import pytest
import torch

from dist_fakes import StepClock
from families import build_family
from mpopt_hf import MPOptArguments, MPOptTrainer
from mpopt_hf.callback.gain import GainMeter, resolve_for_output
from trainer_utils import ListDataset, training_args

def collate(rows):
    """Stacks the tensors; a flag such as CLIP's ``return_loss`` stays a Python value (the default collator would
    make it a tensor of bools)."""
    return {k: torch.stack([r[k] for r in rows]) if torch.is_tensor(rows[0][k]) else rows[0][k] for k in rows[0]}


SMALL_SPACE = dict(micro_batch_sizes=[8, 4], freeze_rates=[0.0], checkpoint_segments=[0], trial_steps=1,
                   search_share=None)


@pytest.mark.parametrize("family, padded, expected",
                         [("clip", False, "loss"), ("gpt2", True, "loss"), ("sam", False, "loss"), ("vit", False, "val_accuracy")])
def test_auto_resolves_from_the_output_and_training_runs(tmp_path, family, padded, expected):
    model, make_batch = build_family(family)
    data = ListDataset(make_batch(16, padded=padded, seed=1))
    trainer = MPOptTrainer(model=model, args=training_args(tmp_path, 8, steps=2, per_device_eval_batch_size=4),
                           train_dataset=data, eval_dataset=ListDataset(make_batch(8, padded=padded, seed=2)),
                           data_collator=collate, mpopt_args=MPOptArguments(**SMALL_SPACE), clock=StepClock())
    trainer.train()
    callback = trainer.mpopt_callback
    assert callback.metric == expected
    assert callback.engine.baseline is not None and math.isfinite(callback.engine.baseline)
    if expected == "loss":
        assert callback.engine.baseline < 0  # the negative of a positive loss: higher is better


def test_loss_metric_is_the_row_weighted_mean_loss_with_a_standard_error_over_batches():
    model, make_batch = build_family("gpt2")
    model.eval()
    data = ListDataset(make_batch(12, padded=True, seed=3))
    meter = GainMeter("loss")
    mean, se = meter.measure(model, None, data, lambda sums: [float(v) for v in sums])
    losses, rows = [], []
    with torch.no_grad():
        for start in range(0, 12, 8):  # the default loader's batches of 8: 8 and 4 rows
            batch = {k: torch.stack([data[i][k] for i in range(start, min(start + 8, 12))]) for k in data[0]}
            losses.append(float(model(**batch).loss))
            rows.append(len(batch["input_ids"]))
    expected = -sum(l * n for l, n in zip(losses, rows)) / sum(rows)
    assert mean == pytest.approx(expected, rel=1e-6)
    spread = sum(n * l * l for l, n in zip(losses, rows)) / sum(rows) - expected**2
    assert se == pytest.approx(math.sqrt(max(spread, 0.0) / 2), rel=1e-5, abs=1e-9)  # two observations


def test_a_logit_metric_on_a_model_without_logits_is_refused_by_name(tmp_path):
    model, make_batch = build_family("clip")
    data = ListDataset(make_batch(8, seed=0))
    trainer = MPOptTrainer(model=model, args=training_args(tmp_path, 8, steps=1), train_dataset=data,
                           eval_dataset=data, data_collator=collate,
                           mpopt_args=MPOptArguments(**SMALL_SPACE, gain_metric="val_accuracy"))
    with pytest.raises(ValueError, match=r"gain_metric='val_accuracy' scores classification logits.*use gain_metric='loss'"):
        trainer.train()


def test_loss_on_an_output_without_loss_is_refused():
    with pytest.raises(ValueError, match=r"gain_metric='loss' .* has none"):
        resolve_for_output("loss", {"pixel_values": torch.zeros(1)}, {"logits": torch.zeros(1, 3)})
    assert resolve_for_output("auto", {"pixel_values": torch.zeros(2)}, {"logits": torch.zeros(2, 3)}) == "entropy"
