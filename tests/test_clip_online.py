"""The CLIP online classifier: zero-shot head, losses, tokenizer, blocks, loading errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import clip_online
from clip_online import CLIPClassifier, CLIPClassifierConfig, WordTokenizer, adaptation_loss
from mpopt_hf.model.blocks import find_blocks
from mpopt_hf.config import MemoryConfig
from mpopt_hf.model.knobs import apply_memory_config, count_trainable_parameters

NAMES = ["zero", "one", "two", "three"]


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    return clip_online.load_clip(clip_online.TINY, NAMES, ["a photo of a {}."])


def test_tokenizer_ids_and_padding():
    tok = WordTokenizer.from_texts(["a photo of a zero.", "a photo of a one."])
    out = tok(["a photo of a zero.", "one"])
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, 8)
    assert out["input_ids"][0, 0].item() == 1 and out["input_ids"][0, 7].item() == 3  # <bos> ... <eos>
    assert out["input_ids"][1, 3:].eq(0).all() and out["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 5
    assert tok.encode("unseen")[1] == 2  # <unk>
    with pytest.raises(ValueError, match="must start with"):
        WordTokenizer(["a", "b"])


def test_zero_shot_head_equals_normalised_text_embeddings(clip_and_tokenizer):
    clip, tok = clip_and_tokenizer
    model = CLIPClassifier.from_clip(clip, tok, NAMES, ["a photo of a {}."])
    clip.eval()
    with torch.no_grad():
        text = clip.get_text_features(**tok([f"a photo of a {n}." for n in NAMES]))
        text = F.normalize(getattr(text, "pooler_output", text), dim=-1)
    torch.testing.assert_close(model.classifier.weight, text)
    # and the logits are CLIP's own image-text logits
    model.eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ours = model(pixel_values=x).logits
        theirs = clip(pixel_values=model.preprocess(x), **tok([f"a photo of a {n}." for n in NAMES])).logits_per_image
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert model.config.id2label[2] == "two"


def test_templates_are_averaged_then_normalised(clip_and_tokenizer):
    clip, _ = clip_and_tokenizer
    templates = ["a photo of a {}.", "a {}."]
    tok = WordTokenizer.from_texts([t.format(n) for t in templates for n in NAMES])
    head = clip_online.text_head(clip, tok, NAMES, templates)
    assert head.shape == (len(NAMES), clip.config.projection_dim)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(len(NAMES)))
    with pytest.raises(ValueError, match="must contain"):
        clip_online.text_head(clip, tok, NAMES, ["no slot"])


@pytest.mark.parametrize("kind", ["entropy", "pseudo_label"])
def test_unsupervised_loss_ignores_labels(clip_and_tokenizer, kind):
    clip, tok = clip_and_tokenizer
    model = CLIPClassifier.from_clip(clip, tok, NAMES, adaptation="unsupervised", unsupervised_loss=kind,
                                     confidence_margin=1.0)
    x = torch.rand(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    with_labels = model(pixel_values=x, labels=labels).loss
    shuffled = model(pixel_values=x, labels=labels[torch.randperm(6)].flip(0)).loss
    without = model(pixel_values=x).loss
    assert with_labels is not None and with_labels.requires_grad
    torch.testing.assert_close(with_labels, shuffled)
    torch.testing.assert_close(with_labels, without)


def test_supervised_loss_uses_labels_and_modes_validate(clip_and_tokenizer):
    clip, tok = clip_and_tokenizer
    model = CLIPClassifier.from_clip(clip, tok, NAMES)
    x = torch.rand(4, 3, 32, 32)
    out = model(pixel_values=x, labels=torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])))
    assert model(pixel_values=x).loss is None
    with pytest.raises(ValueError, match="adaptation must be one of"):
        CLIPClassifierConfig(adaptation="semi")
    with pytest.raises(ValueError, match="unsupervised_loss"):
        CLIPClassifierConfig(unsupervised_loss="tent++")
    with pytest.raises(ValueError, match="adaptation must be one of"):
        model.set_adaptation("both")


def test_unsupervised_losses_add_up_over_micro_batches():
    """Sum over selected / whole batch size: micro-batches weighted by their share give the batch's loss."""
    logits = torch.randn(8, 5) * 3
    for kind in ("entropy", "pseudo_label"):
        whole = adaptation_loss(logits, None, "unsupervised", kind, margin=0.6)
        parts = sum(adaptation_loss(logits[i : i + 3], None, "unsupervised", kind, margin=0.6) * len(logits[i : i + 3]) / 8
                    for i in range(0, 8, 3))
        torch.testing.assert_close(whole, parts)


def test_knobs_find_the_vision_tower(clip_and_tokenizer):
    clip, tok = clip_and_tokenizer
    model = CLIPClassifier.from_clip(clip, tok, NAMES)
    blocks = find_blocks(model)
    assert blocks.family == "clip"
    assert blocks.blocks == list(model.vision_model.encoder.layers)
    assert model.classifier in blocks.head and model.visual_projection in blocks.head
    assert model.vision_model.embeddings in blocks.stem and model.vision_model.pre_layrnorm in blocks.stem
    full = count_trainable_parameters(model)
    apply_memory_config(model, MemoryConfig(micro_batch_size=2, freeze_rate=0.5, checkpoint_segments=2))
    assert count_trainable_parameters(model) < full
    assert model.classifier.weight.requires_grad and not model.vision_model.embeddings.patch_embedding.weight.requires_grad
    model.train()
    loss = model(pixel_values=torch.rand(2, 3, 32, 32), labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert model.vision_model.encoder.layers[-1].mlp.fc1.weight.grad is not None
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.grad is None


def test_save_and_load_through_auto_classes(clip_and_tokenizer, tmp_path):
    from transformers import AutoModelForImageClassification

    clip, tok = clip_and_tokenizer
    model = CLIPClassifier.from_clip(clip, tok, NAMES, adaptation="unsupervised").eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CLIPClassifier) and loaded.config.adaptation == "unsupervised"
    x = torch.rand(2, 3, 40, 40)  # resized inside the model
    torch.testing.assert_close(model(pixel_values=x).logits, loaded(pixel_values=x).logits)


def test_missing_model_names_the_id_and_the_fix():
    with pytest.raises(clip_online.ModelNotAvailableError, match=r"no-such-org/no-such-clip(.|\n)*huggingface-cli download"):
        clip_online.build_classifier("no-such-org/no-such-clip", NAMES)
    with pytest.raises(ValueError, match="class names"):
        clip_online.build_classifier(clip_online.TINY, [])
