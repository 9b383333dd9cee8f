"""SAM retrained online for box-prompted masks under domain shift, scored by mIoU.

    import sam_online
    model = sam_online.build_model("tiny")                          # ~0.18 M parameters, 64 px, built offline
    images, masks, boxes = sam_online.draw_samples(8, seed=0)      # shapes on scikit-image's photographs
    sam_online.miou_on(model, sam_online.to_dataset(images, masks, boxes))

``recipes/sam_seg_online.py`` runs it over a stream of corruptions (``sam_online.run``).
"""

from __future__ import annotations

from .data import DataArguments, load_stream, to_dataset
from .folder import load_folder
from .metrics import evaluate_fn, iou_per_sample, mean_iou, miou_on
from .modeling import (
    SAM_VIT_B,
    TINY,
    ModelNotAvailableError,
    SamForBoxSegmentation,
    build_model,
    mask_loss,
    tiny_config,
    vit_b_config,
)
from .shapes import ShapesConfig, box_of, draw_samples

__all__ = [
    "SAM_VIT_B",
    "TINY",
    "DataArguments",
    "ModelNotAvailableError",
    "SamForBoxSegmentation",
    "ShapesConfig",
    "box_of",
    "build_model",
    "draw_samples",
    "evaluate_fn",
    "iou_per_sample",
    "load_folder",
    "load_stream",
    "mask_loss",
    "mean_iou",
    "miou_on",
    "tiny_config",
    "to_dataset",
    "vit_b_config",
]
