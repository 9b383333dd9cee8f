"""Tiny members of the model families the field uses, with matching batches, for tests.

Every family is built from its config (nothing downloads) with every dropout and drop-path
probability at 0 and a fixed seed, so two builds are bitwise equal and a forward pass is
deterministic; sizes are a few thousand parameters (hidden 16-32, 2 layers per stack, images
of 16-32 pixels, sequences of 10 tokens; the project's own tiny families keep the sizes of
`mpopt_hf.testing.tiny_models`), so one forward/backward takes milliseconds. Every model has at least
2 blocks per stack, so ``checkpoint_segments=2`` is valid everywhere. ``ENCODER_DECODER`` and
``STAGED`` name the families of those shapes; `build_tied_bart` is BART with its hub layout.

    from families import FAMILIES, build_family

    spec = FAMILIES["t5"]
    model = spec.build()                  # train mode, seed 0
    batch = spec.batch(8)                 # dict with labels: model(**batch).loss is a scalar
    padded = spec.batch(8, padded=True)   # sample i ends in i % 4 padding tokens (only if spec.paddable)
    model, make_batch = build_family("t5")  # the same, as a pair

``token_labels``: the labels are per token and the loss averages the tokens whose label is not
-100 (so splitting a padded batch must weight each part by its share of those tokens); otherwise
the loss averages samples. In a padded batch the attention masks are 0 on the padding; for
``token_labels`` families the padded positions' labels are -100.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers as tf
from torch import nn

import small_cnn
import mpopt_hf.testing.tiny_models as tiny
from mpopt_hf.testing.tiny_models import build_tiny, set_dropout

VOCAB = 64
SEQ = 10  # tokens per sample (encoder and decoder alike)
PAD, BOS, EOS, START = 1, 0, 2, 3  # token ids kept out of the random tokens
NUM_LABELS = 3
MAX_PAD = 4  # sample i of a padded batch ends in i % MAX_PAD padding positions

Batch = dict[str, Any]  # tensors, and CLIP's return_loss flag


@dataclass(frozen=True)
class FamilySpec:
    """One family: how to build its tiny model and make a batch for it."""

    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int, bool, torch.Generator], Batch]
    token_labels: bool = False  # per-token labels, -100 ignored (the loss counts tokens, not samples)
    paddable: bool = False  # batch(n, padded=True) is defined (the input is a token sequence)

    def build(self, seed: int = 0) -> nn.Module:
        """A fresh model, seeded, dropout 0, in train mode."""
        torch.manual_seed(seed)
        model = self.make_model()
        set_dropout(model, 0.0)
        return model.train()

    def batch(self, n: int, padded: bool = False, seed: int = 0) -> Batch:
        """``n`` samples with labels; ``padded``: sample i ends in ``i % 4`` padding tokens."""
        if padded and not self.paddable:
            raise ValueError(f"Family {self.name!r} takes no token sequence: a padded batch is not defined.")
        return self.make_batch(n, padded, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- batches


def _tokens(n: int, g: torch.Generator, length: int = SEQ) -> torch.Tensor:
    return torch.randint(4, VOCAB, (n, length), generator=g)


def _pad_counts(n: int, padded: bool) -> list[int]:
    return [i % MAX_PAD if padded else 0 for i in range(n)]


def _mask(n: int, padded: bool, length: int = SEQ) -> torch.Tensor:
    mask = torch.ones(n, length, dtype=torch.long)
    for i, k in enumerate(_pad_counts(n, padded)):
        if k:
            mask[i, -k:] = 0
    return mask


def _ignore_padding(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return labels.masked_fill(mask == 0, -100)


def _causal_lm_batch(n: int, padded: bool, g: torch.Generator) -> Batch:
    mask = _mask(n, padded)
    ids = _tokens(n, g).masked_fill(mask == 0, PAD)
    return {"input_ids": ids, "attention_mask": mask, "labels": _ignore_padding(ids, mask)}


def _classify_text_batch(n: int, padded: bool, g: torch.Generator) -> Batch:
    mask = _mask(n, padded)
    ids = _tokens(n, g).masked_fill(mask == 0, PAD)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, NUM_LABELS, (n,), generator=g)}


def _seq2seq_batch(n: int, padded: bool, g: torch.Generator) -> Batch:
    """Encoder input and labels both padded; the model derives the decoder input from the labels."""
    mask = _mask(n, padded)
    ids = _tokens(n, g).masked_fill(mask == 0, PAD)
    labels = _ignore_padding(_tokens(n, g), _mask(n, padded))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _speech_batch(n: int, padded: bool, g: torch.Generator) -> Batch:
    """Whisper: fixed-length features (the encoder takes no mask), padded labels."""
    features = torch.randn(n, _WHISPER["num_mel_bins"], 2 * _WHISPER["max_source_positions"], generator=g)
    return {"input_features": features, "labels": _ignore_padding(_tokens(n, g), _mask(n, padded))}


def _image_batch(size: int, num_labels: int = NUM_LABELS) -> Callable[[int, bool, torch.Generator], Batch]:
    def make(n: int, padded: bool, g: torch.Generator) -> Batch:
        return {
            "pixel_values": torch.randn(n, 3, size, size, generator=g),
            "labels": torch.randint(0, num_labels, (n,), generator=g),
        }

    return make


def _clip_batch(n: int, padded: bool, g: torch.Generator) -> Batch:
    """Contrastive loss over the batch: no labels, ``return_loss``."""
    ids = torch.randint(3, tiny.VOCAB, (n, tiny.SEQ_LEN), generator=g)
    ids[:, -1] = 1  # the tiny CLIP's eos, which its text tower pools at
    return {
        "pixel_values": torch.randn(n, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, generator=g),
        "input_ids": ids,
        "return_loss": True,
    }


def _sam_batch(n: int, padded: bool, g: torch.Generator) -> Batch:
    size = 64  # the tiny SAM's image size
    return {
        "pixel_values": torch.randn(n, 3, size, size, generator=g),
        "input_points": torch.rand(n, 1, 1, 2, generator=g) * size,
        "labels": (torch.rand(n, size, size, generator=g) > 0.5).long(),
    }


# ---------------------------------------------------------------------------- models

_TEXT = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
_VIT = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    image_size=16,
    patch_size=4,
    num_labels=NUM_LABELS,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
_WHISPER = dict(num_mel_bins=8, max_source_positions=8)


def _bert() -> nn.Module:
    return tf.BertForSequenceClassification(
        tf.BertConfig(
            **_TEXT, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=2 * SEQ, num_labels=NUM_LABELS, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def _gpt2() -> nn.Module:
    return tf.GPT2LMHeadModel(
        tf.GPT2Config(**_TEXT, n_positions=2 * SEQ, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0)
    )


def _llama() -> nn.Module:
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(**_TEXT, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, max_position_embeddings=2 * SEQ)
    )


def _swin() -> nn.Module:
    # three stages of 1, 2, 1 blocks: downsampling between stages, one stage deeper than the others
    return tf.SwinForImageClassification(
        tf.SwinConfig(image_size=32, patch_size=2, embed_dim=8, depths=[1, 2, 1], num_heads=[2, 2, 2], window_size=4,
                      mlp_ratio=2.0, num_labels=NUM_LABELS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      drop_path_rate=0.0)
    )


def _convnext() -> nn.Module:
    return tf.ConvNextForImageClassification(
        tf.ConvNextConfig(num_stages=3, patch_size=4, hidden_sizes=[8, 16, 16], depths=[1, 2, 1], image_size=32,
                          num_labels=NUM_LABELS, drop_path_rate=0.0)
    )


def _hf_resnet() -> nn.Module:
    """transformers' own ResNet: stages of bottlenecks, each holding a list of three convs, BatchNorm."""
    return tf.ResNetForImageClassification(
        tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16], depths=[1, 2, 1], layer_type="bottleneck",
                        num_labels=NUM_LABELS)
    )


def _deit() -> nn.Module:
    return tf.DeiTForImageClassification(tf.DeiTConfig(**_VIT))


def _beit() -> nn.Module:
    return tf.BeitForImageClassification(tf.BeitConfig(**_VIT, drop_path_rate=0.0))


def _dinov2() -> nn.Module:
    vit = {k: v for k, v in _VIT.items() if k != "intermediate_size"}
    return tf.Dinov2ForImageClassification(tf.Dinov2Config(**vit, mlp_ratio=2, drop_path_rate=0.0))


def _t5() -> nn.Module:
    # tie_word_embeddings (the T5 default): lm_head shares the token embedding, which the stem holds
    return tf.T5ForConditionalGeneration(
        tf.T5Config(**_TEXT, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                    relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=PAD)
    )


def _bart(tie: bool = False) -> nn.Module:
    """Untied by default: BART has no final norm, so with its lm_head tied to the (stem's) embedding a
    fully frozen BART has nothing left to train. ``tie=True`` is the hub checkpoints' layout."""
    return tf.BartForConditionalGeneration(
        tf.BartConfig(**_TEXT, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                      max_position_embeddings=2 * SEQ, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                      decoder_start_token_id=EOS, forced_eos_token_id=None, tie_word_embeddings=tie)
    )


def _whisper() -> nn.Module:
    # lm head (proj_out) tied to the decoder's token embedding, as in the hub checkpoints
    return tf.WhisperForConditionalGeneration(
        tf.WhisperConfig(**_TEXT, **_WHISPER, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                         decoder_attention_heads=2, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32,
                         max_target_positions=2 * SEQ, decoder_start_token_id=START, suppress_tokens=[],
                         begin_suppress_tokens=[], dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    )


def _tiny(family: str) -> Callable[[], nn.Module]:
    return lambda: build_tiny(family, num_layers=2, dropout=0.0)


def _resnet18() -> nn.Module:
    return small_cnn.build("resnet18", num_labels=NUM_LABELS, **small_cnn.tiny_overrides("resnet18"))


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec("bert", _bert, _classify_text_batch, paddable=True),
        FamilySpec("gpt2", _gpt2, _causal_lm_batch, token_labels=True, paddable=True),
        FamilySpec("llama", _llama, _causal_lm_batch, token_labels=True, paddable=True),
        FamilySpec("swin", _swin, _image_batch(32)),
        FamilySpec("convnext", _convnext, _image_batch(32)),
        FamilySpec("hf_resnet", _hf_resnet, _image_batch(32)),
        FamilySpec("deit", _deit, _image_batch(16)),
        FamilySpec("beit", _beit, _image_batch(16)),
        FamilySpec("dinov2", _dinov2, _image_batch(16)),
        FamilySpec("t5", _t5, _seq2seq_batch, token_labels=True, paddable=True),
        FamilySpec("bart", _bart, _seq2seq_batch, token_labels=True, paddable=True),
        FamilySpec("whisper", _whisper, _speech_batch, token_labels=True, paddable=True),
        FamilySpec("clip", _tiny("clip"), _clip_batch),
        FamilySpec("vit", _tiny("vit"), _image_batch(tiny.IMAGE_SIZE, num_labels=10)),
        FamilySpec("sam", _tiny("sam"), _sam_batch),
        FamilySpec("gpt_neo", _tiny("gpt_neo"), _causal_lm_batch, token_labels=True, paddable=True),
        FamilySpec("mobilevit", _tiny("mobilevit"), _image_batch(tiny.IMAGE_SIZE, num_labels=10)),
        FamilySpec("resnet18", _resnet18, _image_batch(32)),
    )
}
ENCODER_DECODER = ("t5", "bart", "whisper")
STAGED = ("swin", "convnext", "hf_resnet")


def build_family(name: str, seed: int = 0) -> tuple[nn.Module, Callable[..., Batch]]:
    """``(model, make_batch)`` for family ``name``; ``make_batch(n, padded=False, seed=0)``."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown family {name!r}; known: {sorted(FAMILIES)}.")
    spec = FAMILIES[name]
    return spec.build(seed), spec.batch


def build_tied_bart(seed: int = 0) -> nn.Module:
    """BART as the hub ships it: lm_head tied to the shared token embedding."""
    torch.manual_seed(seed)
    return _bart(tie=True).train()
