"""Losses that couple the batch, and the adapters that let gradient caching split them exactly.

Micro-batching with gradient accumulation is exact only when the loss is a mean (or sum) of
per-sample terms. A contrastive loss (CLIP, SigLIP) compares every sample with the rest of the
batch, so the sum of micro-batch losses is a different objective. A model family declares such a
loss with a `CoupledLossAdapter`: ``embed`` gives the per-sample embeddings the loss needs,
``loss`` the loss from the embeddings of the whole batch. `mpopt_hf.training.grad_cache` then gets the
whole batch's gradient with micro-batch memory (Gao et al. 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup").

Forwards run through the model the trainer holds (a DDP/PEFT/accelerate wrapper included), so
the wrapper's hooks (DDP's reducer, PEFT's adapters, accelerate's autocast) act as in a plain
step; `mpopt_hf.model.blocks.unwrap_model` is used only to recognise the family and to reach
model-level parameters (``logit_scale``) in ``loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model.blocks import unwrap_model

Embeddings = dict[str, torch.Tensor]
Inputs = Mapping[str, Any]
# (model, the whole batch's inputs or None when unknown) -> does this adapter's loss apply?
Matcher = Callable[[nn.Module, "Inputs | None"], bool]


@dataclass(frozen=True)
class CoupledLossAdapter:
    """How one family's batch-coupled loss splits into per-sample embeddings and a loss on them.

    ``embed(model, micro_batch)``: the embeddings, each with the batch as dim 0, computed by a
    forward of ``model`` (the possibly wrapped model: run it, don't unwrap it).
    ``loss(model, embeddings, micro_batches)``: the scalar loss of the whole batch from the
    concatenated embeddings; the micro-batches (in order) are there for losses that need more
    inputs (labels: concatenate them with `concat_inputs`). Parameters used here (``logit_scale``)
    get their gradient from this step.
    ``matches(model, inputs)``: whether the adapter applies (``inputs`` None: unknown batch).
    ``embed_dims(model)``: width of each embedding, and ``pairwise_tensors``: how many
    batch x batch float tensors the loss keeps for backward - both only for the cost model.
    """

    name: str
    matches: Matcher
    embed: Callable[[nn.Module, Inputs], Embeddings]
    loss: Callable[[nn.Module, Embeddings, Sequence[Inputs]], torch.Tensor]
    embed_dims: Callable[[nn.Module], dict[str, int]] | None = None
    pairwise_tensors: int = 4


COUPLED_LOSSES: dict[str, CoupledLossAdapter] = {}


def register_coupled_loss(
    name: str, matcher_or_adapter: CoupledLossAdapter | Matcher, adapter: CoupledLossAdapter | None = None
) -> CoupledLossAdapter:
    """Declare that a model family's loss couples the batch.

    Either ``register_coupled_loss(name, adapter)`` (the adapter's own ``matches`` decides), or
    ``register_coupled_loss(name, matcher, adapter)`` to reuse an adapter for other models.
    Adapters registered later are tried first, so a project can override a built-in one.
    """
    if name in COUPLED_LOSSES:
        raise ValueError(f"A coupled-loss adapter named {name!r} is already registered; pick another name.")
    if isinstance(matcher_or_adapter, CoupledLossAdapter):
        if adapter is not None:
            raise ValueError("Pass either an adapter, or a matcher and an adapter, not two adapters.")
        found = matcher_or_adapter
    elif callable(matcher_or_adapter) and adapter is not None:
        found = CoupledLossAdapter(name, matcher_or_adapter, adapter.embed, adapter.loss, adapter.embed_dims,
                                   adapter.pairwise_tensors)
    else:
        raise ValueError(
            f"register_coupled_loss({name!r}, ...) needs a CoupledLossAdapter, or a matcher "
            "(model, inputs) -> bool followed by a CoupledLossAdapter."
        )
    COUPLED_LOSSES[name] = found
    return found


def unregister_coupled_loss(name: str) -> None:
    COUPLED_LOSSES.pop(name, None)


def find_coupled_loss(model: nn.Module, inputs: Inputs | None = None) -> CoupledLossAdapter | None:
    """The adapter whose loss ``model`` computes on ``inputs``, or None when the loss is per-sample.

    Pass the batch when there is one: a `CLIPModel` is coupled only when asked for its
    contrastive loss (``return_loss=True``).
    """
    for adapter in reversed(list(COUPLED_LOSSES.values())):
        if adapter.matches(model, inputs):
            return adapter
    return None


def concat_inputs(micro_batches: Sequence[Inputs], key: str) -> torch.Tensor:
    """One input of the whole batch, from its micro-batches (e.g. labels for a supervised contrastive loss)."""
    return torch.cat([mb[key] for mb in micro_batches], dim=0)


# ---------------------------------------------------------------------------- dual encoders (CLIP, SigLIP)


def _asks_for_loss(inputs: Inputs | None) -> bool:
    return inputs is None or bool(inputs.get("return_loss", False))


def _class_matcher(class_name: str) -> Matcher:
    """Instances of ``transformers.<class_name>`` (and subclasses) asked for their loss.

    By class, not by name: the project's ``clip_online.CLIPClassifier`` starts with "CLIP" but
    trains with a per-sample cross-entropy over class embeddings and is not coupled.
    """

    def matches(model: nn.Module, inputs: Inputs | None) -> bool:
        import transformers

        cls = getattr(transformers, class_name, None)
        return cls is not None and isinstance(unwrap_model(model), cls) and _asks_for_loss(inputs)

    return matches


def dual_encoder_embed(model: nn.Module, micro_batch: Inputs) -> Embeddings:
    """Image and text embeddings exactly as the model's forward makes them (projected, L2-normalised).

    The model's own forward is called (with ``return_loss=False``), so the embeddings are the ones
    its loss would see, and a wrapper's forward hooks run.
    """
    out = model(**{**micro_batch, "return_loss": False, "return_dict": True})
    return {"image_embeds": out.image_embeds, "text_embeds": out.text_embeds}


def _pairwise_logits(model: nn.Module, embeddings: Embeddings) -> torch.Tensor:
    """``logit_scale.exp() x text . image^T``, as CLIPModel/SiglipModel.forward compute it."""
    text, image = embeddings["text_embeds"], embeddings["image_embeds"]
    scale = unwrap_model(model).logit_scale
    return torch.matmul(text, image.t().to(text.device)) * scale.exp().to(text.device)


def clip_loss(model: nn.Module, embeddings: Embeddings, micro_batches: Sequence[Inputs] = ()) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: the mean of the text->image and image->text cross-entropies."""
    logits_per_text = _pairwise_logits(model, embeddings)
    targets = torch.arange(len(logits_per_text), device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_text.t(), targets)) / 2.0


def siglip_loss(model: nn.Module, embeddings: Embeddings, micro_batches: Sequence[Inputs] = ()) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (with ``logit_bias``), summed over a row, averaged over rows."""
    logits = _pairwise_logits(model, embeddings) + unwrap_model(model).logit_bias.to(embeddings["text_embeds"].device)
    eye = torch.eye(logits.size(0), device=logits.device)
    signs = -torch.ones_like(logits) + 2 * eye
    return -F.logsigmoid(signs * logits).sum(dim=-1).mean()


def _clip_dims(model: nn.Module) -> dict[str, int]:
    dim = unwrap_model(model).config.projection_dim
    return {"image_embeds": dim, "text_embeds": dim}


def _siglip_dims(model: nn.Module) -> dict[str, int]:
    config = unwrap_model(model).config
    text = getattr(config.text_config, "projection_size", None) or config.text_config.hidden_size
    return {"image_embeds": config.vision_config.hidden_size, "text_embeds": text}


def embedding_width(adapter: CoupledLossAdapter, model: nn.Module) -> int:
    """The summed width of the adapter's embeddings (for `mpopt_hf.memory_model.grad_cache_cost`)."""
    if adapter.embed_dims is None:
        raise ValueError(f"The {adapter.name!r} adapter declares no embed_dims; the cost model needs them.")
    return int(sum(adapter.embed_dims(model).values()))


CLIP_CONTRASTIVE = register_coupled_loss(
    "clip", CoupledLossAdapter("clip", _class_matcher("CLIPModel"), dual_encoder_embed, clip_loss, _clip_dims, 4)
)
SIGLIP_SIGMOID = register_coupled_loss(
    "siglip",
    CoupledLossAdapter("siglip", _class_matcher("SiglipModel"), dual_encoder_embed, siglip_loss, _siglip_dims, 4),
)
