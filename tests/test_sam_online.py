"""sam_online's units: the generated and folder data, the mask loss under micro-batching, the blocks, SAM ViT-B's
size from its written-in config, mIoU, and bad flags refused by name. The recipe end to end:
tests/test_recipe_sam_seg_online.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from trainer_utils import ListDataset, run_steps, training_args
from transformers import Trainer

from mpopt_hf import MemoryConfig, MPOptTrainer
from sam_online import SAM_VIT_B, ShapesConfig, box_of, build_model, draw_samples, iou_per_sample, miou_on, to_dataset
from sam_online.data import DataArguments, load_stream
from sam_online.folder import load_folder
from sam_online.modeling import PIXEL_MEAN
from sam_online.run import parse
from vision.errors import DataLayoutError

# ---------------------------------------------------------------------------- data


def test_shapes_are_a_pure_function_of_the_seed_and_boxes_hold_their_masks():
    cfg = ShapesConfig(image_size=32)
    images, masks, boxes = draw_samples(6, (3, 1), cfg)
    again = draw_samples(6, (3, 1), cfg)
    assert all(a.tobytes() == b.tobytes() for a, b in zip((images, masks, boxes), again))  # same seed, same bytes
    assert images.tobytes() != draw_samples(6, (3, 2), cfg)[0].tobytes()  # another seed, other images
    tail = draw_samples(2, (3, 1), cfg, start=4)  # sample i is its own: a subset regenerates the same rows
    assert tail[0].tobytes() == images[4:].tobytes() and tail[2].tobytes() == boxes[4:].tobytes()
    assert images.shape == (6, 3, 32, 32) and images.dtype == np.float32 and 0 <= images.min() <= images.max() <= 1
    assert masks.shape == (6, 32, 32) and set(np.unique(masks)) <= {0.0, 1.0} and boxes.shape == (6, 1, 4)
    for mask, (box,) in zip(masks, boxes):
        assert mask.sum() >= cfg.min_area * 32 * 32
        tight = box_of(mask)
        assert box[0] <= tight[0] and box[1] <= tight[1] and box[2] >= tight[2] and box[3] >= tight[3]  # holds it
        assert 0 <= box.min() and box.max() <= 31
    _, masks, boxes = draw_samples(6, (3, 1), ShapesConfig(image_size=32, box_jitter=0.0))
    for mask, (box,) in zip(masks, boxes):  # no jitter: the prompt is exactly the mask's bounding box
        rows, cols = np.nonzero(mask)
        assert box.tolist() == [cols.min(), rows.min(), cols.max(), rows.max()]


def test_a_corrupted_task_keeps_the_clean_masks_and_is_reproducible():
    data = DataArguments(corruptions=["fog"], train_per_task=8, test_per_task=4, source_size=8, max_objects=2)
    source, (fog,) = load_stream(data, 32)
    _, (again,) = load_stream(data, 32)
    assert fog.name == "fog-5" and fog.corruption == "fog" and fog.severity == 5
    assert fog.sizes == {"train": 8, "val": 4, "test": 4} and len(source.train) == 8
    clean, shifted = source.train[:], fog.train[:]
    assert torch.equal(clean["labels"], shifted["labels"]) and torch.equal(clean["input_boxes"], shifted["input_boxes"])
    assert not torch.equal(clean["pixel_values"], shifted["pixel_values"])  # a corruption moves pixels, no object
    assert torch.equal(shifted["pixel_values"], again.train[:]["pixel_values"])
    assert shifted["labels"].dtype == torch.float32  # float labels: MPOptTrainer weighs micro-batches by samples


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_a_folder_of_images_and_masks_gives_one_sample_per_object(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(4):  # 40x20 images: scaled to 32x16 and padded to 32x32 with SAM's pixel mean
        _png(tmp_path / "images" / f"im{k}.png", rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))
        ids = np.zeros((20, 40), dtype=np.uint8)
        ids[2:8, 4:14] = 255 if k else 1
        if k == 0:
            ids[10:18, 20:36] = 2  # an instance-id mask: two objects
        _png(tmp_path / "masks" / f"im{k}.png", ids)
    splits = load_folder(str(tmp_path), 32, seed=0, pad_value=PIXEL_MEAN)
    assert sum(len(s[0]) for s in splits.values()) == 5  # 3 images x 1 object + 1 image x 2
    assert all(len(s[0]) >= 1 for s in splits.values())
    for images, masks, boxes in splits.values():
        assert images.shape[1:] == (3, 32, 32) and masks.shape[1:] == (32, 32)
        assert np.allclose(images[:, :, 16:, :], np.array(PIXEL_MEAN, dtype=np.float32)[None, :, None, None])
        for mask, (box,) in zip(masks, boxes):
            assert box.tolist() == box_of(mask).tolist() and mask[16:].sum() == 0  # boxes derived from the masks
    boxes = [tuple(b[0].tolist()) for s in splits.values() for b in s[2]]
    assert max(boxes.count(b) for b in boxes) == 4  # the object at rows 2-7, cols 4-13 of every image, scaled alike


def test_a_folder_in_the_wrong_layout_is_refused_naming_the_problem(tmp_path):
    with pytest.raises(DataLayoutError, match=r"images/NAME\.png.*the folder images/ is missing"):
        load_folder(str(tmp_path), 32)
    for k in range(3):
        _png(tmp_path / "images" / f"a{k}.png", np.zeros((8, 8, 3), dtype=np.uint8))
        _png(tmp_path / "masks" / f"a{k}.png", np.full((8, 8), 255, dtype=np.uint8))
    _png(tmp_path / "masks" / "orphan.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DataLayoutError, match=r"no image in images/ for the masks \['orphan\.png'\]"):
        load_folder(str(tmp_path), 32)
    _png(tmp_path / "images" / "orphan.jpg", np.zeros((9, 8, 3), dtype=np.uint8))
    with pytest.raises(DataLayoutError, match=r"orphan\.jpg is 8x9 but its mask 8x8"):
        load_folder(str(tmp_path), 32)
    _png(tmp_path / "images" / "orphan.jpg", np.zeros((8, 8, 3), dtype=np.uint8))
    _png(tmp_path / "masks" / "orphan.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(DataLayoutError, match=r"orphan\.png is a RGB PNG, expected a single channel"):
        load_folder(str(tmp_path), 32)


# ---------------------------------------------------------------------------- the model and its loss


def _batch(n: int, size: int = 32) -> dict:
    images, masks, boxes = draw_samples(n, 7, ShapesConfig(image_size=size))
    return {"pixel_values": torch.from_numpy(images), "input_boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(masks)}


def _step_gradient(trainer_cls, batch, tmp_path, **kwargs) -> torch.Tensor:
    model = build_model("tiny", image_size=32)
    args = training_args(tmp_path, len(batch["labels"]), optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
                         train_sampling_strategy="sequential")
    _, capture = run_steps(trainer_cls, model, ListDataset(batch), args, **kwargs)
    grads = capture.grads[0]
    return torch.cat([torch.zeros(1) if g is None else g.flatten() for _, g in sorted(grads.items())])


@pytest.mark.usefixtures("one_torch_thread")
def test_the_mask_loss_has_the_whole_batchs_gradient_in_weighted_micro_batches(tmp_path):
    batch = _batch(8)
    reference = _step_gradient(Trainer, batch, tmp_path)
    assert reference.norm() > 0
    for config in (MemoryConfig(4), MemoryConfig(3, checkpoint_segments=2)):  # 4 + 4, and 3/3/2 checkpointed
        got = _step_gradient(MPOptTrainer, batch, tmp_path, memory_config=config)
        assert ((got - reference).norm() / reference.norm()).item() < 1e-6, config.short()


def test_blocks_are_the_vision_layers_and_the_decoder_stays_trainable():
    from mpopt_hf.model.blocks import find_blocks
    from mpopt_hf.model.knobs import apply_memory_config

    model = build_model("tiny", image_size=32)
    blocks = find_blocks(model)
    assert blocks.family == "sam" and blocks.blocks == list(model.vision_encoder.layers)
    apply_memory_config(model, MemoryConfig(8, freeze_rate=0.5))
    assert not any(p.requires_grad for p in model.vision_encoder.layers[0].parameters())
    assert not model.vision_encoder.patch_embed.projection.weight.requires_grad  # the stem goes with block 0
    for trainable in (model.vision_encoder.layers[1], model.vision_encoder.neck, model.prompt_encoder,
                      model.mask_decoder):
        assert all(p.requires_grad for p in trainable.parameters())
    out = model(**_batch(2))
    assert out.logits.shape == (2, 16, 16) and out.loss.ndim == 0 and out.loss.requires_grad


def test_sam_vit_b_from_its_written_in_config_has_the_published_size():
    """facebook/sam-vit-base: 93,735,472 parameters in segment-anything's sam_vit_b (image encoder 89,670,912, mask
    decoder 4,058,340, prompt encoder 6,220), plus the 2 x 128 random-Fourier matrix of the prompt encoder that
    segment-anything keeps as a buffer and transformers as a (tied) parameter."""
    from sam_online.run import ModelArguments, input_size

    with torch.device("meta"):
        model = build_model(SAM_VIT_B, random_init=True)
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(model.vision_encoder) == 89_670_912 and count(model.mask_decoder) == 4_058_340
    assert count(model.prompt_encoder) == 6_220 + 256
    assert count(model) == 93_735_472 + 256
    assert input_size(ModelArguments(model=SAM_VIT_B, random_init=True, pretrain_steps=0), SAM_VIT_B) == 1024
    assert 1e5 < count(build_model("tiny")) < 1e6


# ---------------------------------------------------------------------------- mIoU


class _BoxFiller(nn.Module):
    """Predicts the prompt's box, filled, at half the image's resolution (as SAM's decoder is below it)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values, input_boxes):
        side = pixel_values.shape[-1] // 2
        centres = torch.arange(side, dtype=torch.float32) * 2 + 0.5
        x0, y0, x1, y1 = (input_boxes[:, 0, i, None] for i in range(4))
        inside = ((centres >= x0) & (centres <= x1))[:, None, :] & ((centres >= y0) & (centres <= y1))[:, :, None]
        return type("Out", (), {"logits": torch.where(inside, 10.0, -10.0) + self.anchor})()


def test_miou_is_one_for_a_perfect_prediction_and_zero_for_a_disjoint_one():
    masks = np.zeros((3, 16, 16), dtype=np.float32)
    boxes = np.array([[[0, 0, 7, 7]], [[8, 8, 15, 15]], [[2, 4, 9, 13]]], dtype=np.float32)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes[:, 0].astype(int)):
        mask[y0:y1 + 1, x0:x1 + 1] = 1
    images = np.zeros((3, 3, 16, 16), dtype=np.float32)
    assert miou_on(_BoxFiller(), to_dataset(images, masks, boxes), batch_size=2) == 1.0
    far = np.array([[[8, 8, 15, 15]], [[0, 0, 7, 7]], [[10, 0, 15, 1]]], dtype=np.float32)
    assert miou_on(_BoxFiller(), to_dataset(images, masks, far), batch_size=2) == 0.0
    a, b = torch.zeros(2, 4, 4, dtype=torch.bool), torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2], b[0, 1:3] = True, True  # 4 pixels shared of 12 covered
    assert iou_per_sample(a, b).tolist() == [1 / 3, 1.0]  # both empty: nothing to find, nothing found


# ---------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--gain_metric", "entropy"], r"gain_metric.*'entropy' scores classification logits, but SAM's are mask"),
        (["--random_init", "true"], r"random_init True with --model tiny: the tiny SAM is always built"),
        (["--model", SAM_VIT_B, "--random_init", "true", "--pretrain_steps", "5"],
         r"pretrain_steps 5 with --random_init true"),
        (["--model", "org/other-sam", "--random_init", "true"],
         r"architectures written in the code are \['facebook/sam-vit-base'\]"),
        (["--image_size", "60"], r"image_size \(--image_size\) must be an int >= 16, a multiple of 8"),
        (["--model", SAM_VIT_B, "--image_size", "64"], r"a checkpoint's input side is its config's"),
        (["--model", "./no/such/sam"], r"the local path .* does not exist"),
        (["--data_dir", "/nonexistent"], r"data_dir \(--data_dir\) '/nonexistent' is not a folder"),
        (["--corruptions", "blur"], r"corruptions \(--corruptions\) holds \['blur'\]; allowed: corruption names"),
        (["--severity", "6"], r"severity \(--severity\) must be an int in 1\.\.5, got 6"),
        (["--max_objects", "0"], r"max_objects \(--max_objects\) must be an int in 1\.\.8"),
        (["--baseline", "best"], r"baseline must be one of"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        parse(["--output_dir", str(tmp_path), *flags])
