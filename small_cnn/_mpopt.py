"""Tell `mpopt_hf` where the zoo's blocks are (imported by the package, so every zoo model has it).

The arrows point one way: ``small_cnn`` knows ``mpopt_hf``'s adapter registry, ``mpopt_hf`` never
imports ``small_cnn``.
"""

from __future__ import annotations

from torch import nn

from mpopt_hf.model.blocks import ModelBlocks, register_block_adapter


def zoo_blocks(model: nn.Module) -> ModelBlocks | None:
    """``stem -> blocks -> head`` of a zoo model, straight from the attributes every family builds."""
    # By module name rather than isinstance: a reloaded package defines new classes.
    if not type(model).__module__.startswith("small_cnn"):
        return None
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return None
    return ModelBlocks(family="small_cnn", blocks=list(blocks), stem=[model.stem], head=[model.head])


register_block_adapter("small_cnn", zoo_blocks, exist_ok=True)  # exist_ok: importlib.reload must not fail
