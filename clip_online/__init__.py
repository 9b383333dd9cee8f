"""CLIP as an online classifier: a prompt-initialised (zero-shot) head and unsupervised adaptation losses.

    import clip_online
    model = clip_online.build_classifier("tiny", class_names=["zero", "one"], adaptation="unsupervised")
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForImageClassification

from .loading import TINY, ModelNotAvailableError, build_classifier, build_tiny_clip, load_clip
from .losses import ADAPTATIONS, UNSUPERVISED_LOSSES, adaptation_loss, entropy, entropy_loss, pseudo_label_loss
from .modeling import DEFAULT_TEMPLATES, CLIPClassifier, CLIPClassifierConfig, text_head
from .tokenizer import WordTokenizer

AutoConfig.register(CLIPClassifierConfig.model_type, CLIPClassifierConfig, exist_ok=True)
AutoModelForImageClassification.register(CLIPClassifierConfig, CLIPClassifier, exist_ok=True)

__all__ = [
    "ADAPTATIONS",
    "CLIPClassifier",
    "CLIPClassifierConfig",
    "DEFAULT_TEMPLATES",
    "ModelNotAvailableError",
    "TINY",
    "UNSUPERVISED_LOSSES",
    "WordTokenizer",
    "adaptation_loss",
    "build_classifier",
    "build_tiny_clip",
    "entropy",
    "entropy_loss",
    "load_clip",
    "pseudo_label_loss",
    "text_head",
]
