"""`CLIPClassifier`: CLIP's vision tower with a linear head initialised from prompts.

The head's rows are the normalised text embeddings of "a photo of a {class}."
(averaged over templates), and the logits are ``logit_scale x cos(image, row)``,
so the untrained classifier *is* CLIP's zero-shot classifier. Only the vision
tower is kept: the text tower is needed once, to build the head.

The attribute names (``vision_model``, ``visual_projection``, ``classifier``)
are the ones `mpopt_hf.model.blocks` looks for, so the knobs see family ``clip`` with
the vision encoder layers as blocks, the embeddings + ``pre_layrnorm`` as stem
and the projection + head as head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from mpopt_hf.config import check_int, check_number

from .losses import ADAPTATIONS, UNSUPERVISED_LOSSES, adaptation_loss

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TEMPLATES = ("a photo of a {}.",)


class CLIPClassifierConfig(PretrainedConfig):
    """Configuration of a `CLIPClassifier`.

    ``adaptation`` picks the training loss: ``supervised`` (cross-entropy on ``labels``) or ``unsupervised``
    (``unsupervised_loss``: ``entropy`` minimisation or ``pseudo_label`` cross-entropy, on the samples whose
    entropy is below ``confidence_margin x ln(num_labels)``; labels are ignored).
    Inputs are images in [0, 1]; they are resized to the tower's ``image_size`` and normalised with
    ``image_mean``/``image_std`` inside the model, so data sets need not know which CLIP they feed.
    """

    model_type = "clip_online_classifier"
    sub_configs = {"vision_config": CLIPVisionConfig}

    vision_config: dict | CLIPVisionConfig | None = None
    projection_dim: int = 512
    logit_scale: float = 100.0
    adaptation: str = "supervised"
    unsupervised_loss: str = "entropy"
    confidence_margin: float = 0.4
    image_mean: list[float] | tuple[float, ...] = CLIP_MEAN
    image_std: list[float] | tuple[float, ...] = CLIP_STD

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = CLIPVisionConfig()
        elif isinstance(self.vision_config, dict):
            self.vision_config = CLIPVisionConfig(**self.vision_config)
        self.image_mean, self.image_std = list(self.image_mean), list(self.image_std)
        if self.adaptation not in ADAPTATIONS:
            raise ValueError(f"CLIPClassifierConfig.adaptation must be one of {list(ADAPTATIONS)}, got {self.adaptation!r}.")
        if self.unsupervised_loss not in UNSUPERVISED_LOSSES:
            raise ValueError(
                f"CLIPClassifierConfig.unsupervised_loss must be one of {list(UNSUPERVISED_LOSSES)}, "
                f"got {self.unsupervised_loss!r}."
            )
        where = "CLIPClassifierConfig."
        self.confidence_margin = check_number(where + "confidence_margin", self.confidence_margin,
                                              lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
        self.logit_scale = check_number(where + "logit_scale", self.logit_scale, lambda v: v > 0, "a finite number > 0")
        self.projection_dim = check_int(where + "projection_dim", self.projection_dim, lambda v: v >= 1, "an int >= 1")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != 3:
                raise ValueError(f"{where}{name} must hold 3 numbers (one per RGB channel), got {values!r}.")
            for v in values:
                check_number(f"{where}{name}", v, (lambda x: x > 0) if name == "image_std" else (lambda x: True),
                             "finite numbers" + (" > 0" if name == "image_std" else ""))
        super().__post_init__(**kwargs)


class CLIPClassifier(PreTrainedModel):
    """CLIP image classifier: vision tower -> projection -> L2 norm -> prompt-initialised linear head."""

    config: CLIPClassifierConfig
    config_class = CLIPClassifierConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    base_model_prefix = "clip_classifier"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    # The losses are batch means (or sums over the batch size) and ignore `num_items_in_batch`.
    accepts_loss_kwargs = False

    def __init__(self, config: CLIPClassifierConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.classifier = nn.Linear(config.projection_dim, config.num_labels, bias=False)
        self.register_buffer("pixel_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "visual_projection", None) or module is getattr(self, "classifier", None):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
        elif hasattr(self, "pixel_mean") and module is self:
            self.pixel_mean.copy_(torch.tensor(self.config.image_mean).view(1, 3, 1, 1))
            self.pixel_std.copy_(torch.tensor(self.config.image_std).view(1, 3, 1, 1))

    def preprocess(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the tower's size and CLIP's normalisation."""
        size = self.config.vision_config.image_size
        if pixel_values.shape[-2:] != (size, size):
            pixel_values = F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False)
        return (pixel_values - self.pixel_mean.to(pixel_values.dtype)) / self.pixel_std.to(pixel_values.dtype)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=self.preprocess(pixel_values)).pooler_output
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        """Logits ``logit_scale x classifier(normalised image embedding)``; the loss follows ``config.adaptation``."""
        logits = self.config.logit_scale * self.classifier(self.image_embeddings(pixel_values))
        loss = adaptation_loss(
            logits,
            labels,
            self.config.adaptation,
            unsupervised_loss=self.config.unsupervised_loss,
            margin=self.config.confidence_margin,
        )
        return ImageClassifierOutput(loss=loss, logits=logits)

    def set_adaptation(self, adaptation: str, unsupervised_loss: str | None = None) -> None:
        """Switch the training loss (e.g. supervised source training, then unsupervised adaptation)."""
        if adaptation not in ADAPTATIONS:
            raise ValueError(f"adaptation must be one of {list(ADAPTATIONS)}, got {adaptation!r}.")
        self.config.adaptation = adaptation
        if unsupervised_loss is not None:
            if unsupervised_loss not in UNSUPERVISED_LOSSES:
                raise ValueError(f"unsupervised_loss must be one of {list(UNSUPERVISED_LOSSES)}, got {unsupervised_loss!r}.")
            self.config.unsupervised_loss = unsupervised_loss

    # ------------------------------------------------------------------ zero-shot construction

    @classmethod
    def from_clip(
        cls,
        clip_model: nn.Module,
        tokenizer,
        class_names: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        **config_kwargs,
    ) -> "CLIPClassifier":
        """The zero-shot classifier of a `CLIPModel`: its vision tower and a head of prompt embeddings."""
        clip_config = clip_model.config
        config = CLIPClassifierConfig(
            vision_config=clip_config.vision_config.to_dict(),
            projection_dim=clip_config.projection_dim,
            logit_scale=float(clip_model.logit_scale.detach().exp()),
            id2label={i: name for i, name in enumerate(class_names)},
            label2id={name: i for i, name in enumerate(class_names)},
            **config_kwargs,
        )
        model = cls(config)
        model.vision_model.load_state_dict(clip_model.vision_model.state_dict())
        model.visual_projection.load_state_dict(clip_model.visual_projection.state_dict())
        with torch.no_grad():
            model.classifier.weight.copy_(text_head(clip_model, tokenizer, class_names, templates))
        return model.to(next(clip_model.parameters()).dtype)


@torch.no_grad()
def text_head(clip_model: nn.Module, tokenizer, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(num_classes, projection_dim): per class, the mean of the normalised prompt embeddings, normalised again."""
    if not class_names:
        raise ValueError("text_head needs at least one class name.")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"Every prompt template must contain '{{}}' for the class name, got {list(templates)}.")
    was_training = clip_model.training
    clip_model.eval()
    device = next(clip_model.parameters()).device
    rows = []
    for name in class_names:
        inputs = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        features = clip_model.get_text_features(**inputs)
        features = getattr(features, "pooler_output", features)  # transformers 5 returns a ModelOutput
        rows.append(F.normalize(F.normalize(features.float(), dim=-1).mean(dim=0), dim=-1))
    clip_model.train(was_training)
    return torch.stack(rows)
