"""Scoring a model on a task's split: argmax predictions and their accuracy (the online loop's default metric)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def predict_labels(model: nn.Module, dataset, batch_size: int = 256, label_column: str = "labels") -> list[int]:
    """Argmax predictions of ``model`` over ``dataset`` (every column but the labels goes to the model)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = dataset.with_format("torch")
    inputs = [c for c in data.column_names if c != label_column]
    predictions: list[int] = []
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        logits = model(**{k: rows[k].to(device) for k in inputs}).logits
        predictions.extend(logits.argmax(dim=-1).tolist())
    model.train(was_training)
    return predictions


def accuracy_on(model: nn.Module, dataset, metric, batch_size: int = 256, label_column: str = "labels") -> float:
    if label_column not in dataset.column_names:
        raise ValueError(f"Evaluation data need a {label_column!r} column; columns are {dataset.column_names}.")
    predictions = predict_labels(model, dataset, batch_size, label_column)
    return float(metric.compute(predictions=predictions, references=list(dataset[label_column]))["accuracy"])
