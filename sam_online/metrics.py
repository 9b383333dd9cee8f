"""mIoU of box-prompted masks: the recipe's score before and after each task (higher is better).

The IoU of a sample is |predicted & true| / |predicted | true| of its one object, the prediction being the mask
logits > 0 resized to the label's size; mIoU is its mean over the samples (each object counts once, as in SAM's
and MedSAM's evaluations). A sample whose label and prediction are both empty scores 1 (nothing to find, nothing
found).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .modeling import resize_logits


def iou_per_sample(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each of N binary masks (N, H, W) against its target (the same shape), float64 (N,)."""
    if predicted.shape != target.shape:
        raise ValueError(f"iou_per_sample: predicted masks {tuple(predicted.shape)} and targets "
                         f"{tuple(target.shape)} differ in shape.")
    predicted, target = predicted.bool().flatten(1), target.bool().flatten(1)
    inter = (predicted & target).sum(1).double()
    union = (predicted | target).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def mean_iou(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """mIoU of N masks against their targets: the mean of `iou_per_sample`."""
    return float(iou_per_sample(predicted, target).mean())


@torch.no_grad()
def sample_ious(model: nn.Module, dataset, batch_size: int = 64) -> torch.Tensor:
    """The IoU of every sample of ``dataset`` (pixel_values, input_boxes, labels) under ``model``'s masks."""
    if len(dataset) == 0:
        raise ValueError("mIoU of an empty data set is undefined; give it at least one sample.")
    missing = {"pixel_values", "input_boxes", "labels"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"mIoU needs the columns pixel_values, input_boxes and labels; missing {sorted(missing)}.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = dataset.with_format("torch")
    ious = []
    try:
        for start in range(0, len(data), batch_size):
            rows = data[start:start + batch_size]
            inputs = {k: rows[k].to(device) for k in ("pixel_values", "input_boxes")}
            logits = model(**inputs).logits
            labels = rows["labels"].to(device)
            ious.append(iou_per_sample(resize_logits(logits.float(), tuple(labels.shape[-2:])) > 0, labels > 0.5).cpu())
    finally:
        model.train(was_training)
    return torch.cat(ious)


def miou_on(model: nn.Module, dataset, batch_size: int = 64) -> float:
    """mIoU of ``model`` on ``dataset``."""
    return float(sample_ious(model, dataset, batch_size).mean())


def evaluate_fn(batch_size: int = 64) -> Callable[[nn.Module, object], float]:
    """``(model, dataset) -> mIoU``, evaluating ``batch_size`` samples at a time: `OnlineRetrainer`'s evaluate_fn."""
    def evaluate(model: nn.Module, dataset) -> float:
        return miou_on(model, dataset, batch_size)

    return evaluate
