"""Building `MPOptCallback`'s rule engine at the first step: the search space, the memory budget, the default
cost model, and the `RuleEngine` over the predicted candidates (the same on every rank)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..budget import read_budget_bytes
from ..config import MemoryConfig, MPOptArguments
from ..cost import FakeTensorCostModel, ProfileCostModel, plain_optimizer
from ..engine import (
    MIB,
    Candidate,
    CostModel,
    RuleEngine,
    default_checkpoint_segments,
    default_freeze_rates,
    default_micro_batch_sizes,
    enumerate_configs,
)
from ..training.ranks import distributed

logger = logging.getLogger(__name__)


def budget_bytes(a: MPOptArguments, args) -> float | None:
    """The budget now (`mpopt_hf.budget`: a number, 'auto' or a callable), or on CUDA without one the device's memory."""
    if a.memory_budget_mib is not None:
        return read_budget_bytes(a.memory_budget_mib, args.device)
    if args.device.type == "cuda":  # the device's memory; the margin is applied by the feasibility rule
        return float(torch.cuda.get_device_properties(args.device).total_memory)
    return None


def default_precisions(args) -> list[str]:
    if args.fp16:
        return ["fp16"]
    if args.bf16:  # accelerate autocasts every forward then: bf16 is the run's only precision
        return ["bf16"]
    if args.device.type == "cuda" and torch.cuda.is_bf16_supported():
        return ["fp32", "bf16"]
    return ["fp32"]


def search_space(a: MPOptArguments, args, n_blocks: int, effective: int, plain: bool) -> list[MemoryConfig]:
    """The configurations to choose from; ``plain``: a plain Trainer, whose micro-batch and precision are fixed."""
    if plain and a.optimizer_states != ["fp32"]:
        raise ValueError(
            f"MPOptArguments.optimizer_states={a.optimizer_states} needs MPOptTrainer, which builds the optimizer for "
            "8-bit state; with a plain Trainer keep optimizer_states=['fp32'].")
    if plain and a.lora_ranks != [0]:
        raise ValueError(
            f"MPOptArguments.lora_ranks={a.lora_ranks} needs MPOptTrainer, which puts the adapters into its optimizer; "
            "with a plain Trainer keep lora_ranks=[0].")
    if plain:
        micro, precisions = [effective], ["fp16" if args.fp16 else ("bf16" if args.bf16 else "fp32")]
    else:
        micro = a.micro_batch_sizes or default_micro_batch_sizes(effective)
        precisions = a.precisions or default_precisions(args)
    configs = enumerate_configs(
        [m for m in micro if m <= effective] or [effective],
        a.freeze_rates if a.freeze_rates is not None else default_freeze_rates(n_blocks),
        a.checkpoint_segments if a.checkpoint_segments is not None else default_checkpoint_segments(n_blocks),
        precisions,
        n_blocks,
        batch_sizes=[None] if plain else update_batches(a, args, effective),
        checkpoint_policies=a.checkpoint_policies,
        optimizer_states=a.optimizer_states,
        lora_ranks=a.lora_ranks,
    )
    if not configs:
        raise ValueError(
            f"The search space is empty for a model with {n_blocks} blocks: check MPOptArguments.checkpoint_segments "
            f"(each must be <= the trainable blocks) and freeze_rates."
        )
    return configs


def update_batches(a: MPOptArguments, args, effective: int) -> list[int | None]:
    """The batches per update the engine may choose: None (the loader's, the user's batch), and each of
    ``effective_batch_sizes`` below it, which must divide it (every update then has the same size)."""
    sizes = a.effective_batch_sizes or []
    bad = [b for b in sizes if b > effective or effective % b]
    if bad:
        raise ValueError(
            f"MPOptArguments.effective_batch_sizes holds {bad}: each must divide per_device_train_batch_size="
            f"{effective} (the loader yields that batch and a smaller one splits it into equal updates); set "
            f"per_device_train_batch_size to the largest batch you allow.")
    if sizes and args.gradient_accumulation_steps > 1:
        raise ValueError(
            f"MPOptArguments.effective_batch_sizes needs gradient_accumulation_steps=1 (got "
            f"{args.gradient_accumulation_steps}): micro-batching already accumulates inside the step; set "
            "per_device_train_batch_size to your whole batch instead.")
    return [None] + [b for b in sizes if b != effective]


def default_cost_model(a: MPOptArguments, model: nn.Module, batch: dict[str, Any], optimizer: Any,
                       space: list[MemoryConfig], args, store: Any, store_key: Any) -> tuple[CostModel, Any, Any]:
    """MPOptArguments.cost_predictor: the fitted memory model ('profile', through the profile store when one
    is set) or one fake-tensor step per configuration ('fake'). Returns it with the (store, store_key) in use."""
    if a.cost_predictor == "fake":
        return FakeTensorCostModel(model, batch, optimizer, lr=args.learning_rate), store, store_key
    from ..profiler import profile_key
    from ..store import open_store

    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    if store is None and a.profile_store is not None:
        store = open_store(None if a.profile_store == "default" else a.profile_store)
        store_key = profile_key(model, batch, plain_optimizer(optimizer))
    space = list(dict.fromkeys(c.without_batch() for c in space))  # what the fit prices: the batch adds no memory
    cost = ProfileCostModel.fit(model, batch, optimizer, space, store, budget_bytes=budget_bytes(a, args),
                                margin=a.safety_margin)
    cost.price_grad_caching(model, batch)
    logger.info("mpopt cost model: %s in %.1f s", "fit reused from the profile store" if cost.reused
                else f"fitted from {len(cost.profile.measurements)} measured configuration(s)", cost.seconds)
    return cost, store, store_key


def build_engine(a: MPOptArguments, args, model: nn.Module, configs: list[MemoryConfig], effective: int,
                 cost_model: CostModel | None, store: Any, store_key: Any,
                 on_infeasible: Callable[[MemoryConfig, str], None], metric_ceiling: float | None = None) -> RuleEngine:
    """The engine over ``configs`` priced by ``cost_model``; a race's host copies of the model's training state
    count against the budget (`host_copy_bytes`), and projections are capped at ``metric_ceiling``."""
    budget = budget_bytes(a, args)
    if budget is not None and cost_model is None:
        raise ValueError(
            f"MPOptArguments.memory_budget_mib={budget / MIB:.1f} needs a cost model to predict peaks: pass "
            "cost_model=... (e.g. the profiler's fitted memory model) or a train_dataloader to predict from, or leave memory_budget_mib=None and let "
            "out-of-memory errors steer the search."
        )
    candidates = [Candidate(c, *price(cost_model, c, effective)) if cost_model is not None else Candidate(c)
                  for c in configs]
    candidates = same_on_every_rank(candidates)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return RuleEngine(
        candidates,
        budget_bytes=budget,
        margin=engine_margin(a.safety_margin, cost_model),
        trial_steps=a.trial_steps,
        trial_max_s=a.trial_max_s,
        search_share=a.search_share,
        strategy=a.strategy,
        gain_per=a.gain_per,
        significance=a.significance,
        late_gain=a.late_gain,
        exploration=a.exploration,
        discount=a.discount,
        drift_threshold=a.drift_threshold,
        retune_every_steps=a.retune_every_steps,
        time_budget_s=a.time_budget_s,
        has_batchnorm=has_bn,
        bn_min_micro_batch=a.bn_min_micro_batch,
        effective_batch=effective,
        on_infeasible=on_infeasible,
        known_infeasible=store.infeasible(store_key) if store is not None else None,
        metric_ceiling=metric_ceiling,
        copy_bytes=host_copy_bytes(model, cost_model, effective),
    )


def price(cost_model: CostModel, config: MemoryConfig, effective: int) -> tuple[float | None, float | None]:
    """(peak, seconds per loader batch) of ``config``. The batch knob adds no memory (the micro-batch is what is
    held) and, per loader batch, more optimizer updates: priced as the same step (the updates' own time is learned
    from the steps that run, `StepTimeLearner`)."""
    return cost_model.predict(config.without_batch())


def engine_margin(safety_margin: float, cost_model: CostModel | None) -> float:
    """The share of the budget kept free: the user's margin, or more where the cost model's own fit says its
    predictions can be that far under a measurement (its leave-one-out uncertainty), so that what the engine
    chooses stays inside the budget when it runs."""
    uncertainty = getattr(cost_model, "uncertainty", 0.0) or 0.0
    if uncertainty > safety_margin:
        logger.info("mpopt: keeping %.1f%% of the budget free (the fit's uncertainty; safety_margin is %.1f%%)",
                    100 * min(uncertainty, 0.5), 100 * safety_margin)
    return max(safety_margin, min(uncertainty, 0.5))


def host_copy_bytes(model: nn.Module, cost_model: CostModel | None, effective: int) -> float:
    """Bytes of one race copy (`snapshot.capture`: weights, buffers, optimizer state) that count against the
    budget: on a CPU the host is the device; a GPU's copies live off it (0)."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return 0.0
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t))
    profile = getattr(cost_model, "profile", None)
    if profile is not None:  # the optimizer's state as the fit predicts it once every trainable tensor has it
        state = profile.model.predict(MemoryConfig(effective), effective).optimizer_state
    else:  # Adam-like: two moments per trainable parameter
        state = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return float(weights + state)


def same_on_every_rank(candidates: list[Candidate]) -> list[Candidate]:
    """Rank 0's predictions for every rank: measured step times differ between processes, and engines that
    prune differently would choose differently and deadlock in the gradient all-reduce."""
    if not distributed():
        return candidates
    payload = [[c.to_dict() for c in candidates]]
    dist.broadcast_object_list(payload, src=0)
    return [Candidate.from_dict(c) for c in payload[0]]


__all__ = ["budget_bytes", "build_engine", "default_cost_model", "default_precisions", "engine_margin", "host_copy_bytes",
           "price", "search_space", "update_batches"]
