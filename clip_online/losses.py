"""Adaptation losses of the CLIP classifier.

Each loss is a sum over the selected samples divided by the *whole* batch size,
so a batch split into micro-batches (weighted by their share) gives exactly the
loss, and the gradient, of the whole batch, whichever samples are selected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ADAPTATIONS = ("supervised", "unsupervised")
UNSUPERVISED_LOSSES = ("entropy", "pseudo_label")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax of each row, in nats."""
    log_p = logits.float().log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def confident_mask(logits: torch.Tensor, margin: float) -> torch.Tensor:
    """Samples whose entropy is below ``margin x ln(num_classes)`` (EATA's reliability filter; margin 1 keeps all)."""
    if margin >= 1.0:
        return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    return entropy(logits.detach()) < margin * math.log(logits.shape[-1])


def entropy_loss(logits: torch.Tensor, margin: float = 0.4) -> torch.Tensor:
    """Tent-style entropy minimisation on the confident samples of the batch."""
    mask = confident_mask(logits, margin)
    return (entropy(logits) * mask).sum() / logits.shape[0]


def pseudo_label_loss(logits: torch.Tensor, margin: float = 0.4) -> torch.Tensor:
    """Cross-entropy against the model's own (detached) argmax, on the confident samples."""
    mask = confident_mask(logits, margin)
    targets = logits.detach().argmax(dim=-1)
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    return (losses * mask).sum() / logits.shape[0]


def adaptation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    adaptation: str,
    unsupervised_loss: str = "entropy",
    margin: float = 0.4,
) -> torch.Tensor | None:
    """The training loss for ``adaptation``; the unsupervised losses never look at ``labels``."""
    if adaptation == "supervised":
        return None if labels is None else F.cross_entropy(logits.float(), labels.to(logits.device))
    if adaptation == "unsupervised":
        if unsupervised_loss == "entropy":
            return entropy_loss(logits, margin)
        if unsupervised_loss == "pseudo_label":
            return pseudo_label_loss(logits, margin)
        raise ValueError(f"unsupervised_loss must be one of {list(UNSUPERVISED_LOSSES)}, got {unsupervised_loss!r}.")
    raise ValueError(f"adaptation must be one of {list(ADAPTATIONS)}, got {adaptation!r}.")
