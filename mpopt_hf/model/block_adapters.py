"""Block adapters for the families the generic rule of `blocks` cannot read alone.

CLIP (two towers, interleaved), ViT, SAM (loose positional parameter), GPT-Neo, MobileViT
(stages of different types) and every encoder-decoder (encoder blocks, then decoder blocks).
Each names the stem and the blocks; `find_blocks` completes the head. Imported by `blocks`,
which registers these before any package's own adapter.
"""

from __future__ import annotations

from torch import nn

from .blocks import (
    ModelBlocks,
    find_stack,
    get_module,
    get_modules,
    modules_around,
    register_block_adapter,
)


def interleave_by_depth(towers: list[list[nn.Module]]) -> list[nn.Module]:
    """Merge parallel towers so that a prefix holds the lowest layers of every tower in proportion."""
    keyed = [((i + 0.5) / len(tower), t, block) for t, tower in enumerate(towers) for i, block in enumerate(tower)]
    return [block for _, _, block in sorted(keyed, key=lambda item: (item[0], item[1]))]


def _clip(model: nn.Module) -> ModelBlocks | None:
    towers, stems, heads = [], [], []
    for name in ("vision_model", "text_model"):
        tower = getattr(model, name, None)
        if tower is None or not type(tower).__name__.startswith("CLIP"):
            continue
        layers = get_module(tower, "encoder.layers")
        if layers is None:
            return None
        towers.append(list(layers))
        stems.append(tower.embeddings)
        heads += get_modules(tower, ["post_layernorm", "final_layer_norm"])
    if not towers:
        return None
    # CLIP's vision tower normalises right after the embeddings: that LayerNorm belongs to the stem.
    stems += get_modules(model, ["vision_model.pre_layrnorm"])
    heads += get_modules(model, ["visual_projection", "text_projection", "classifier"])
    return ModelBlocks(family="clip", blocks=interleave_by_depth(towers), stem=stems, head=heads)


def _vit(model: nn.Module) -> ModelBlocks | None:
    vit = getattr(model, "vit", None)
    if vit is None and type(model).__name__.startswith("ViT"):
        vit = model
    if vit is None or not type(vit).__name__.startswith("ViT"):
        return None
    layers = get_module(vit, "layers") or get_module(vit, "encoder.layer") or get_module(vit, "encoder.layers")
    if layers is None:
        return None
    head = get_modules(vit, ["layernorm", "pooler"]) + get_modules(model, ["classifier"])
    return ModelBlocks(family="vit", blocks=list(layers), stem=[vit.embeddings], head=head)


def _sam(model: nn.Module) -> ModelBlocks | None:
    encoder = getattr(model, "vision_encoder", None)
    if encoder is None or not type(encoder).__name__.startswith("Sam"):
        return None
    layers = get_module(encoder, "layers")
    if layers is None:
        return None
    stem_params = [p for _, p in encoder.named_parameters(recurse=False)]
    head = get_modules(encoder, ["neck"])
    head += get_modules(model, ["prompt_encoder", "mask_decoder", "shared_image_embedding"])
    return ModelBlocks(
        family="sam", blocks=list(layers), stem=[encoder.patch_embed], head=head, stem_parameters=stem_params
    )


def _gpt_neo(model: nn.Module) -> ModelBlocks | None:
    transformer = getattr(model, "transformer", model)
    if not type(transformer).__name__.startswith("GPTNeo"):
        return None
    layers = get_module(transformer, "h")
    if layers is None:
        return None
    stem = get_modules(transformer, ["wte", "wpe"])
    head = get_modules(transformer, ["ln_f"]) + get_modules(model, ["lm_head", "score", "qa_outputs"])
    return ModelBlocks(family="gpt_neo", blocks=list(layers), stem=stem, head=head)


def _mobilevit(model: nn.Module) -> ModelBlocks | None:
    mvit = getattr(model, "mobilevit", model)
    if not type(mvit).__name__.startswith("MobileViT"):
        return None
    layers = get_module(mvit, "encoder.layer")
    if layers is None:
        return None
    head = get_modules(mvit, ["conv_1x1_exp"]) + get_modules(model, ["classifier"])
    return ModelBlocks(family="mobilevit", blocks=list(layers), stem=get_modules(mvit, ["conv_stem"]), head=head)


def _encoder_decoder(model: nn.Module) -> ModelBlocks | None:
    """T5, BART, Whisper, Marian, ...: the encoder's blocks, then the decoder's.

    Both sides' embeddings are the stem (T5 and BART share one token embedding between them, so it
    cannot be split; Whisper's conv front end is the encoder's). What follows the encoder's blocks (its
    final norm) is attached to the last encoder block: it feeds every decoder block's cross-attention,
    so leaving it trainable behind a frozen encoder would keep the whole decoder's activations.
    """
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    if not (callable(getattr(model, "get_encoder", None)) and callable(getattr(model, "get_decoder", None))):
        return None
    encoder, decoder = model.get_encoder(), model.get_decoder()
    if not isinstance(encoder, nn.Module) or not isinstance(decoder, nn.Module) or model in (encoder, decoder):
        return None
    enc, dec = find_stack(encoder), find_stack(decoder)
    if encoder is decoder or enc is None or dec is None:
        return None
    enc_stem, enc_params, enc_after = modules_around(encoder, enc.path)
    dec_stem, dec_params, dec_after = modules_around(decoder, dec.path)
    n_enc = len(enc.blocks)
    attached = dict(enc.attached)
    if enc_after:
        attached.setdefault(n_enc - 1, []).extend(enc_after)
    attached.update({n_enc + i: modules for i, modules in dec.attached.items()})
    return ModelBlocks(
        family="encoder_decoder",
        blocks=enc.blocks + dec.blocks,
        stem=enc_stem + enc.before + dec_stem + dec.before,
        head=dec_after,  # find_blocks adds the LM head
        stem_parameters=enc_params + dec_params,
        attached=attached,
    )


for _name, _adapter in (
    ("clip", _clip),
    ("vit", _vit),
    ("sam", _sam),
    ("gpt_neo", _gpt_neo),
    ("mobilevit", _mobilevit),
    ("encoder_decoder", _encoder_decoder),
):
    register_block_adapter(_name, _adapter, exist_ok=True)
