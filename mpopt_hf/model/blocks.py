"""Find a model's stem, ordered repeated blocks and head.

Freezing and checkpointing act on *blocks*: freezing takes a prefix of them
(counted from the input) together with the stem, checkpointing picks some of the
trainable ones. Freezing only saves memory when it is a prefix in forward order:
then nothing before the first trainable block needs a gradient and backward stops
there. The rules below are built around that:

* the **stem** is what runs before the first block (embeddings, patch embeddings,
  conv stems, positional tables);
* a module that runs *between* two blocks (a stage's downsampling layer, an
  encoder's final norm) is *attached* to the block before it: frozen with it,
  never checkpointed with it;
* everything else is **head** (final norms, poolers, classifiers, LM heads) and is
  never frozen. `find_blocks` completes every adapter's head so that stem, blocks
  and head hold each parameter of the model exactly once;
* a parameter tied between the stem and the head (an LM head sharing the token
  embedding) belongs to the stem: were it trainable, the embedding's output would
  need a gradient and every frozen block would keep its activations.

Adapters in `block_adapters` (and packages such as ``small_cnn``, through
`register_block_adapter`) know families the generic rule cannot read; the generic
rule takes the longest container of same-type blocks, flattening staged backbones
(Swin, ConvNeXt, ResNet: a list of stages each holding a list of blocks).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn


@dataclass
class ModelBlocks:
    """A model seen as ``stem -> blocks -> head``.

    ``stem`` modules and ``stem_parameters`` (parameters owned directly by a container, such as
    SAM's positional embedding) are frozen together with the first block; ``head_parameters`` are
    such loose parameters of the head (CLIP's ``logit_scale``). ``attached[i]`` are modules
    that run after block ``i`` and before block ``i + 1`` (frozen with block ``i``, not checkpointed).
    Everything that is neither stem nor a block counts as head and is never frozen by the knobs.
    """

    family: str
    blocks: list[nn.Module]
    stem: list[nn.Module] = field(default_factory=list)
    head: list[nn.Module] = field(default_factory=list)
    stem_parameters: list[nn.Parameter] = field(default_factory=list)
    head_parameters: list[nn.Parameter] = field(default_factory=list)
    attached: dict[int, list[nn.Module]] = field(default_factory=dict)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def stem_params(self) -> list[nn.Parameter]:
        return _unique([*self.stem_parameters, *_params_of(self.stem)])

    def block_modules(self, index: int) -> list[nn.Module]:
        """Block ``index`` and the modules attached to it: what freezing block ``index`` freezes."""
        return [self.blocks[index], *self.attached.get(index, [])]

    def block_params(self, index: int) -> list[nn.Parameter]:
        return _unique(list(_params_of(self.block_modules(index))))

    def head_params(self) -> list[nn.Parameter]:
        """The head's own parameters: those tied to the stem or a block are not counted again."""
        claimed = {id(p) for p in self.stem_params()}
        claimed.update(id(p) for i in range(self.n_blocks) for p in self.block_params(i))
        return [p for p in _unique([*self.head_parameters, *_params_of(self.head)]) if id(p) not in claimed]


BlockAdapter = Callable[[nn.Module], "ModelBlocks | None"]
BLOCK_ADAPTERS: dict[str, BlockAdapter] = {}


def register_block_adapter(name: str, adapter: BlockAdapter, exist_ok: bool = False) -> None:
    """Teach `find_blocks` a new family. Adapters are tried in registration order.

    ``adapter(model)`` returns `ModelBlocks` (at least ``family``, ``blocks`` and ``stem``; the head is
    completed by `find_blocks`) or None for a model it does not know. ``exist_ok=True`` replaces an
    adapter of the same name in place (a package re-imported in a notebook).
    """
    if name in BLOCK_ADAPTERS and not exist_ok:
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
    """The model's stem, ordered repeated blocks and head (every parameter in exactly one of them)."""
    base = unwrap_model(model)
    for adapter in BLOCK_ADAPTERS.values():
        found = adapter(base)
        if found is not None and found.blocks:
            return complete_head(base, found)
    found = _generic_blocks(base)
    if found is None:
        raise ValueError(
            f"Cannot find repeated blocks in {type(base).__name__}: no adapter matched "
            f"(known families: {sorted(BLOCK_ADAPTERS)}) and it holds no nn.ModuleList/nn.Sequential of two or "
            "more modules of one type. Register an adapter with mpopt_hf.model.blocks.register_block_adapter(name, fn) "
            "where fn(model) returns ModelBlocks(family, blocks, stem, head)."
        )
    return complete_head(base, found)


def complete_head(model: nn.Module, found: ModelBlocks) -> ModelBlocks:
    """Add to ``found.head`` the largest modules (and loose parameters) that no list holds yet."""
    claimed = {id(p) for p in found.stem_params()} | {id(p) for p in found.head_params()}
    claimed.update(id(p) for i in range(found.n_blocks) for p in found.block_params(i))
    listed = {id(m) for m in [*found.stem, *found.head, *found.blocks, *_flat(found.attached.values())]}
    visited: set[int] = set()

    def walk(module: nn.Module) -> None:
        for p in module.parameters(recurse=False):
            if id(p) not in claimed:
                claimed.add(id(p))
                found.head_parameters.append(p)
        for child in module.children():
            if id(child) in listed or id(child) in visited:
                continue
            visited.add(id(child))
            params = list(child.parameters())
            if all(id(p) in claimed for p in params):
                continue
            if not any(id(p) in claimed for p in params) and not any(id(m) in listed for m in child.modules()):
                found.head.append(child)
                claimed.update(id(p) for p in params)
            else:
                walk(child)

    walk(model)
    # An LM head whose weight is tied to the embedding is claimed already, but it runs last: name it.
    output = _output_embeddings(model)
    inside_head = any(output is m for h in found.head for m in h.modules())
    if output is not None and id(output) not in listed and not inside_head:
        found.head.append(output)
    return found


# ---------------------------------------------------------------------------- the generic rule

# Names of modules or parameters that feed the first block even when registered after it (BART's
# ``layernorm_embedding``, ViT's ``cls_token``, ``position_embeddings``, ``pos_embed``, ``patch_embed``).
EMBEDDING_NAME = re.compile(r"emb|token|(^|_)pos(_|ition|$)|patch", re.IGNORECASE)


@dataclass
class Stack:
    """Blocks found under one container: ``path`` from the searched root, the modules around them."""

    path: str
    blocks: list[nn.Module]
    attached: dict[int, list[nn.Module]] = field(default_factory=dict)
    before: list[nn.Module] = field(default_factory=list)  # inside the container, before the first block
    staged: bool = False


def find_stack(root: nn.Module) -> Stack | None:
    """The main run of same-type blocks under ``root``, flattening a list of stages.

    Among the candidates the library's own checkpointing layers win (an MoE layer's list of experts
    must not beat the layers), then the one holding the most weights (a ResNet bottleneck's three convs
    must not beat the stages' bottlenecks), then the most blocks, then the staged reading (finer units).
    """
    candidates: list[Stack] = []
    for path, module in root.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2 and _uniform(list(module)):
            candidates.append(Stack(path, list(module)))
            staged = _staged(path, list(module))
            if staged is not None:
                candidates.append(staged)
    if not candidates:
        return None
    return max(candidates, key=lambda s: (all(map(_is_checkpointing_layer, s.blocks)), _weights(s), len(s.blocks),
                                          s.staged))


def _weights(stack: Stack) -> int:
    modules = [*stack.blocks, *_flat(stack.attached.values())]
    return sum(p.numel() for p in _unique(_params_of(modules)))


def modules_around(
    root: nn.Module, path: str
) -> tuple[list[nn.Module], list[nn.Parameter], list[nn.Module]]:
    """Stem modules, stem parameters and the modules after the block container at ``path``.

    On the way from ``root`` to the container, a sibling registered before the path runs before the
    blocks (HF registers modules in forward order); one registered after runs after them unless its
    name says it is an embedding (never the output embeddings). Modules without parameters are left out.
    """
    output = _output_embeddings(root)
    stem: list[nn.Module] = []
    stem_params: list[nn.Parameter] = []
    after: list[nn.Module] = []
    module = root
    for part in path.split(".") if path else []:
        passed = False
        for name, child in module.named_children():
            if name == part:
                passed = True
            elif _has_params(child):
                runs_before = child is not output and (not passed or EMBEDDING_NAME.search(name) is not None)
                (stem if runs_before else after).append(child)
        stem_params += [p for n, p in module.named_parameters(recurse=False) if EMBEDDING_NAME.search(n)]
        module = module.get_submodule(part)
    return stem, stem_params, after


def _generic_blocks(model: nn.Module) -> ModelBlocks | None:
    stack = find_stack(model)
    if stack is None:
        return None
    stem, stem_params, _after = modules_around(model, stack.path)  # what runs after is head
    return ModelBlocks(
        family="generic",
        blocks=stack.blocks,
        stem=stem + stack.before,
        stem_parameters=stem_params,
        attached=stack.attached,
    )


def _staged(path: str, stages: list[nn.Module]) -> Stack | None:
    """Read ``stages`` as stages when each holds exactly one list of blocks, all of one type."""
    lists = [
        [(n, c) for n, c in stage.named_children()
         if isinstance(c, (nn.ModuleList, nn.Sequential)) and len(c) >= 1 and _uniform(list(c))]
        for stage in stages
    ]
    common = set.intersection(*({type(c[0]) for _, c in found} for found in lists))
    if len(common) != 1:
        return None
    block_type = common.pop()
    stack = Stack(path, [], staged=True)
    for stage, found in zip(stages, lists):
        chosen = [name for name, c in found if type(c[0]) is block_type]
        if len(chosen) != 1:
            return None
        passed, after = False, []
        for name, child in stage.named_children():
            if name == chosen[0]:
                passed = True
            elif _has_params(child):
                if passed:
                    after.append(child)
                elif stack.blocks:  # between the previous stage's last block and this stage's first
                    stack.attached.setdefault(len(stack.blocks) - 1, []).append(child)
                else:
                    stack.before.append(child)
        stack.blocks.extend(stage.get_submodule(chosen[0]))
        if after:
            stack.attached.setdefault(len(stack.blocks) - 1, []).extend(after)
    return stack


# ---------------------------------------------------------------------------- helpers


def _uniform(children: list[nn.Module]) -> bool:
    """Same type, and each has parameters (a list of activations or dropouts is no stack)."""
    return len({type(c) for c in children}) == 1 and all(_has_params(c) for c in children)


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    """An HF model's LM head (``get_output_embeddings``), if it has one."""
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    return output if isinstance(output, nn.Module) else None


def _is_checkpointing_layer(module: nn.Module) -> bool:
    # by name: importing transformers.modeling_layers here would load the library for plain torch models
    return any(cls.__name__ == "GradientCheckpointingLayer" for cls in type(module).__mro__)


def _flat(lists: Iterable[list[nn.Module]]) -> list[nn.Module]:
    return [m for modules in lists for m in modules]


def _params_of(modules: Iterable[nn.Module]) -> Iterable[nn.Parameter]:
    for module in modules:
        yield from module.parameters()


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def get_module(model: nn.Module, path: str) -> nn.Module | None:
    """``model.<path>`` when every step exists and the end is a module, else None."""
    obj: object = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def get_modules(model: nn.Module, paths: list[str]) -> list[nn.Module]:
    return [m for m in (get_module(model, p) for p in paths) if m is not None]


from . import block_adapters  # noqa: E402,F401  registers the built-in families (needs the names above)
