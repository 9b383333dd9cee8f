"""Find the ordered, repeated blocks of a model.

Freezing and checkpointing act on *blocks*: freezing takes a prefix of them
(counted from the input), checkpointing picks some of the trainable ones. A
small registry of adapters knows where the blocks live in each supported
family; a generic fallback takes the longest container of same-type modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn


@dataclass
class ModelBlocks:
    """A model seen as ``stem -> blocks -> head``.

    ``stem`` modules and ``stem_parameters`` (parameters owned directly by a container, such as
    SAM's positional embedding) are frozen together with the first block. Everything that is
    neither stem nor a block counts as head and is never frozen by the knobs.
    """

    family: str
    blocks: list[nn.Module]
    stem: list[nn.Module] = field(default_factory=list)
    head: list[nn.Module] = field(default_factory=list)
    stem_parameters: list[nn.Parameter] = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def stem_params(self) -> list[nn.Parameter]:
        params = list(self.stem_parameters)
        for module in self.stem:
            params.extend(module.parameters())
        return _unique(params)

    def block_params(self, index: int) -> list[nn.Parameter]:
        return list(self.blocks[index].parameters())


BlockAdapter = Callable[[nn.Module], "ModelBlocks | None"]
BLOCK_ADAPTERS: dict[str, BlockAdapter] = {}


def register_block_adapter(name: str, adapter: BlockAdapter) -> None:
    """Teach `find_blocks` a new family. Adapters are tried in registration order."""
    if name in BLOCK_ADAPTERS:
        raise ValueError(f"A block adapter named {name!r} is already registered; pick another name.")
    BLOCK_ADAPTERS[name] = adapter


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/accelerate (``.module``) and PEFT (``get_base_model``) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            base = model.get_base_model()
            if base is not model:
                model = base
                continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and type(model).__name__ in {
            "DistributedDataParallel",
            "DataParallel",
            "FullyShardedDataParallel",
        }:
            model = inner
            continue
        # torch.compile wrapper
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
    return model


def find_blocks(model: nn.Module) -> ModelBlocks:
    """The model's stem, ordered repeated blocks and head."""
    base = unwrap_model(model)
    for adapter in BLOCK_ADAPTERS.values():
        found = adapter(base)
        if found is not None and found.blocks:
            return found
    found = _generic_blocks(base)
    if found is None:
        raise ValueError(
            f"Cannot find repeated blocks in {type(base).__name__}: no adapter matched "
            f"(known families: {sorted(BLOCK_ADAPTERS)}) and it holds no nn.ModuleList/nn.Sequential of two or "
            "more modules of one type. Register an adapter with mpopt_hf.blocks.register_block_adapter(name, fn) "
            "where fn(model) returns ModelBlocks(family, blocks, stem, head)."
        )
    return found


# ---------------------------------------------------------------------------- helpers


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _get(model: nn.Module, path: str) -> nn.Module | None:
    obj: object = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _modules(model: nn.Module, paths: list[str]) -> list[nn.Module]:
    return [m for m in (_get(model, p) for p in paths) if m is not None]


def _interleave_by_depth(towers: list[list[nn.Module]]) -> list[nn.Module]:
    """Merge parallel towers so that a prefix holds the lowest layers of every tower in proportion."""
    keyed = [((i + 0.5) / len(tower), t, block) for t, tower in enumerate(towers) for i, block in enumerate(tower)]
    return [block for _, _, block in sorted(keyed, key=lambda item: (item[0], item[1]))]


# ---------------------------------------------------------------------------- adapters


def _small_cnn(model: nn.Module) -> ModelBlocks | None:
    if not type(model).__module__.startswith("small_cnn"):
        return None
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return None
    return ModelBlocks(family="small_cnn", blocks=list(blocks), stem=[model.stem], head=[model.head])


def _clip(model: nn.Module) -> ModelBlocks | None:
    towers, stems, heads = [], [], []
    for name in ("vision_model", "text_model"):
        tower = getattr(model, name, None)
        if tower is None or not type(tower).__name__.startswith("CLIP"):
            continue
        layers = _get(tower, "encoder.layers")
        if layers is None:
            return None
        towers.append(list(layers))
        stems.append(tower.embeddings)
        heads += _modules(tower, ["post_layernorm", "final_layer_norm", "pre_layrnorm"])
    if not towers:
        return None
    # CLIP's vision tower normalises right after the embeddings: that LayerNorm belongs to the stem.
    pre = _get(model, "vision_model.pre_layrnorm")
    if pre is not None:
        stems.append(pre)
        heads = [h for h in heads if h is not pre]
    heads += _modules(model, ["visual_projection", "text_projection", "classifier"])
    return ModelBlocks(family="clip", blocks=_interleave_by_depth(towers), stem=stems, head=heads)


def _vit(model: nn.Module) -> ModelBlocks | None:
    vit = getattr(model, "vit", None)
    if vit is None and type(model).__name__.startswith("ViT"):
        vit = model
    if vit is None or not type(vit).__name__.startswith("ViT"):
        return None
    layers = _get(vit, "layers") or _get(vit, "encoder.layer") or _get(vit, "encoder.layers")
    if layers is None:
        return None
    head = _modules(vit, ["layernorm", "pooler"]) + _modules(model, ["classifier"])
    return ModelBlocks(family="vit", blocks=list(layers), stem=[vit.embeddings], head=head)


def _sam(model: nn.Module) -> ModelBlocks | None:
    encoder = getattr(model, "vision_encoder", None)
    if encoder is None or not type(encoder).__name__.startswith("Sam"):
        return None
    layers = _get(encoder, "layers")
    if layers is None:
        return None
    stem_params = [p for name, p in encoder.named_parameters(recurse=False)]
    head = _modules(encoder, ["neck"]) + _modules(model, ["prompt_encoder", "mask_decoder", "shared_image_embedding"])
    return ModelBlocks(
        family="sam", blocks=list(layers), stem=[encoder.patch_embed], head=head, stem_parameters=stem_params
    )


def _gpt_neo(model: nn.Module) -> ModelBlocks | None:
    transformer = getattr(model, "transformer", model)
    if not type(transformer).__name__.startswith("GPTNeo"):
        return None
    layers = _get(transformer, "h")
    if layers is None:
        return None
    stem = _modules(transformer, ["wte", "wpe"])
    head = _modules(transformer, ["ln_f"]) + _modules(model, ["lm_head", "score", "qa_outputs"])
    return ModelBlocks(family="gpt_neo", blocks=list(layers), stem=stem, head=head)


def _mobilevit(model: nn.Module) -> ModelBlocks | None:
    mvit = getattr(model, "mobilevit", model)
    if not type(mvit).__name__.startswith("MobileViT"):
        return None
    layers = _get(mvit, "encoder.layer")
    if layers is None:
        return None
    head = _modules(mvit, ["conv_1x1_exp"]) + _modules(model, ["classifier"])
    return ModelBlocks(family="mobilevit", blocks=list(layers), stem=_modules(mvit, ["conv_stem"]), head=head)


def _generic_blocks(model: nn.Module) -> ModelBlocks | None:
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            children = list(module)
            if len({type(c) for c in children}) == 1 and any(True for _ in children[0].parameters()):
                if len(children) > len(best):
                    best = children
    if not best:
        return None
    return ModelBlocks(family="generic", blocks=best)


for _name, _adapter in (
    ("small_cnn", _small_cnn),
    ("clip", _clip),
    ("vit", _vit),
    ("sam", _sam),
    ("gpt_neo", _gpt_neo),
    ("mobilevit", _mobilevit),
):
    register_block_adapter(_name, _adapter)
