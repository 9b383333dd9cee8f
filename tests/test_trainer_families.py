"""The exact gradient on every family: one MPOptTrainer step under micro-batching and checkpointing equals a
plain Trainer step on the whole batch, for encoder-only, decoder-only, encoder-decoder, hierarchical vision,
convolutional and speech models, also with labels padded by a varying number of -100 tokens.

BatchNorm trains on the statistics of the batch it sees, so under micro-batching its gradient is that of
smaller batches: there (the CNN zoo, MobileViT) the statistics are frozen for the comparison, which is
what the knobs guarantee for frozen blocks and what the engine's ``bn_min_micro_batch`` guards elsewhere.
"""

import pytest
import torch
from torch import nn
from transformers import Trainer

from families import FAMILIES
from mpopt_hf import MemoryConfig, MPOptTrainer
from mpopt_hf.training.coupling_check import CoupledLossError
from trainer_utils import ListDataset, run_steps, training_args

BATCH = 8
CONFIGS = [MemoryConfig(2, checkpoint_segments=2), MemoryConfig(3, checkpoint_segments=2),  # 4 x 2 and 3/3/2
           MemoryConfig(3, checkpoint_segments=2, checkpoint_policy="selective")]
CASES = [(name, False) for name in FAMILIES] + [(name, True) for name, spec in FAMILIES.items() if spec.paddable]


def _freeze_batchnorm_statistics(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(lambda m, args: None if m.train(False) else None)


def _collate(rows: list[dict]) -> dict:
    """Stack tensors; flags such as CLIP's ``return_loss`` stay Python values."""
    return {k: torch.stack([r[k] for r in rows]) if torch.is_tensor(v) else v for k, v in rows[0].items()}


def _step_gradient(trainer_cls, spec, batch, tmp_path, accumulation: int = 1, **kwargs) -> torch.Tensor:
    model = spec.build()
    _freeze_batchnorm_statistics(model)
    args = training_args(tmp_path, BATCH // accumulation, optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
                         train_sampling_strategy="sequential", gradient_accumulation_steps=accumulation)
    _, capture = run_steps(trainer_cls, model, ListDataset(batch), args, data_collator=_collate, **kwargs)
    grads = capture.grads[0]
    return torch.cat([torch.zeros(1) if g is None else g.flatten() for _, g in sorted(grads.items())])


@pytest.mark.parametrize("family, padded", CASES, ids=[f"{n}{'-padded' if p else ''}" for n, p in CASES])
def test_one_step_equals_a_plain_trainer_step(tmp_path, family, padded, one_torch_thread):
    spec = FAMILIES[family]
    batch = spec.batch(BATCH, padded=padded)
    reference = _step_gradient(Trainer, spec, batch, tmp_path)
    assert reference.norm() > 0
    for config in CONFIGS:
        got = _step_gradient(MPOptTrainer, spec, batch, tmp_path, memory_config=config)
        error = ((got - reference).norm() / reference.norm()).item()
        assert error < 1e-6, (config.short(), error)


@pytest.mark.parametrize("family, padded", [("bert", False), ("t5", True), ("clip", False)])
def test_trainer_gradient_accumulation_composes(tmp_path, family, padded, one_torch_thread):
    """Trainer's gradient_accumulation_steps=2 over loader batches of 4, each split in micro-batches of 2,
    is the whole batch of 8: items counted over both loader batches, a coupled loss over all of them."""
    spec = FAMILIES[family]
    batch = spec.batch(BATCH, padded=padded)
    reference = _step_gradient(Trainer, spec, batch, tmp_path)
    got = _step_gradient(MPOptTrainer, spec, batch, tmp_path, accumulation=2, memory_config=MemoryConfig(2))
    assert ((got - reference).norm() / reference.norm()).item() < 1e-6


def test_shares_by_samples_on_a_padded_batch_are_caught(tmp_path):
    """The weighting by tokens is what makes padded batches exact: weighted by samples instead, the step's
    gradient would be off, and the check before the first split step refuses it, pointing at loss_items."""
    spec = FAMILIES["t5"]
    batch = spec.batch(BATCH, padded=True)
    with pytest.raises(CoupledLossError, match=r"T5ForConditionalGeneration.*differs.*by \d+\.\d+%.*loss_items"):
        _step_gradient(MPOptTrainer, spec, batch, tmp_path, memory_config=CONFIGS[0],
                       loss_items=lambda micro_batch: micro_batch["labels"].shape[0])
