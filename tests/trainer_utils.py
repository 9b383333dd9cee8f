"""Shared helpers for trainer tests: tiny datasets and one-step gradient capture."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments


class ListDataset(torch.utils.data.Dataset):
    """Rows of a batch dict as a map-style dataset (non-tensor entries are repeated on every row)."""

    def __init__(self, batch: dict):
        self.tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        self.extra = {k: v for k, v in batch.items() if not torch.is_tensor(v)}
        self.n = len(next(iter(self.tensors.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.tensors.items()}, **self.extra}


class GradCapture(TrainerCallback):
    """Copies every gradient just before each optimizer step."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor | None]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()})


def training_args(tmp_path, batch_size: int, steps: int = 1, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def run_steps(trainer_cls, model, dataset, args, callbacks=(), **trainer_kwargs):
    capture = GradCapture()
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, callbacks=[capture, *callbacks], **trainer_kwargs)
    trainer.train()
    return trainer, capture


def plain_trainer_grads(model, dataset, args):
    _, capture = run_steps(Trainer, model, dataset, args)
    return capture.grads


def saved_activation_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes autograd keeps for backward after one forward, counted with ``saved_tensors_hooks``.

    Parameters are excluded (they live anyway); each storage is counted once.
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def train_for(model: torch.nn.Module, batch: dict, config, optimizer, steps: int) -> None:
    """Apply ``config`` and run ``steps`` real steps as the profiler runs them; every weight must stay finite."""
    from mpopt_hf.model.knobs import apply_memory_config
    from mpopt_hf.profiler import train_step

    apply_memory_config(model, config)
    model.train()
    for _ in range(steps):
        train_step(model, batch, config, optimizer)
    assert all(torch.isfinite(p).all() for p in model.parameters()), config
