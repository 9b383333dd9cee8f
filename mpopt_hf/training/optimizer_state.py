"""The optimizer-state knob: AdamW's two moments held in 32 bits or in bitsandbytes' blockwise 8 bits.

One optimizer object serves the whole run: bitsandbytes' ``AdamW`` runs each parameter's update in 32 or 8 bits
according to the dtype of that parameter's state, so switching is converting the state tensors in place
(quantize or dequantize, blockwise), never building a new optimizer. The moments are kept (up to the 8-bit
rounding), the learning-rate scheduler and accelerate's wrapper keep their optimizer, and a checkpoint holds the
state in whichever form it has.

An 8-bit moment costs 1 byte per element plus one fp32 absolute maximum per block of 256 elements, instead of 4
bytes; tensors below ``min_8bit_size`` elements (biases, norms) stay in 32 bits, as in bitsandbytes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

BLOCK = 256  # bitsandbytes' block for 8-bit optimizer states
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep 32-bit states
QMAP_BYTES = 2 * 256 * 4  # the signed and unsigned 8-bit code books, shared by every parameter
_QUANT_KEYS = ("qmap1", "qmap2", "absmax1", "absmax2", "unorm_vec")
_NESTED = "__bnb_optimizer_quant_state__"  # where bitsandbytes' state_dict nests its moments (for FSDP)
_MARK = "_mpopt_switchable_state"  # set on the optimizers built here: a user's own bitsandbytes one is left alone


def bitsandbytes() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError(
            "MemoryConfig.optimizer_state='8bit' needs bitsandbytes (its 8-bit AdamW): pip install bitsandbytes, "
            "or keep optimizer_state='fp32'."
        ) from err
    return bnb


def is_switchable(optimizer: Any) -> bool:
    """True for the bitsandbytes AdamW this module builds (its state can be converted in place); a bitsandbytes
    optimizer the user chose (``optim="adamw_bnb_8bit"``, Lion, ...) is theirs and keeps its own rules."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    return bool(getattr(inner, _MARK, False))


def mark_switchable(optimizer: Any) -> Any:
    """Mark a bitsandbytes AdamW built like `switchable_adamw`'s (e.g. a fake copy of one) as switchable, with a
    config manager of its own: bitsandbytes' global one keeps per-parameter overrides by (group, index), which
    another optimizer in the process (Trainer's ``adamw_bnb_8bit`` registers its embeddings there) would
    otherwise impose on this one."""
    manager_cls = type(optimizer.mng)
    own = manager_cls.__new__(manager_cls)
    own.initialize()
    optimizer.mng = own
    setattr(optimizer, _MARK, True)
    return optimizer


def wants_low_bit(memory_config: Any, mpopt_args: Any, callbacks: Any) -> bool:
    """Whether a trainer may be asked for 8-bit state: its configuration, its arguments or an engine callback's
    (the online loop hands the next task's trainer its callback) list it."""
    listed = [getattr(memory_config, "optimizer_state", None), *(getattr(mpopt_args, "optimizer_states", None) or [])]
    for callback in callbacks:
        listed += getattr(getattr(callback, "mpopt_args", None), "optimizer_states", None) or []
    return "8bit" in listed


def switchable_adamw(optimizer: torch.optim.Optimizer, min_8bit_size: int = MIN_8BIT_SIZE) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW over ``optimizer``'s parameter groups and hyperparameters, starting in 32 bits.

    Only torch's AdamW (Trainer's default ``optim``) is converted: another optimizer would change the update rule,
    which a memory knob must not do."""
    if is_switchable(optimizer):
        return optimizer
    if type(optimizer) is not torch.optim.AdamW:
        raise ValueError(
            f"MemoryConfig.optimizer_state='8bit' needs torch's AdamW (TrainingArguments.optim='adamw_torch' or "
            f"'adamw_torch_fused'), whose update bitsandbytes' 8-bit AdamW runs; got {type(optimizer).__name__}. Use "
            "that optimizer, or keep optimizer_state='fp32'."
        )
    bad = [k for k in ("amsgrad", "maximize", "capturable") if any(g.get(k) for g in optimizer.param_groups)]
    if bad or optimizer.state:
        raise ValueError(f"MemoryConfig.optimizer_state='8bit': the AdamW to convert must be new and plain (got "
                         f"{bad or 'existing state'}).")
    bnb = bitsandbytes()
    groups = [{"params": g["params"], "lr": g["lr"], "betas": g["betas"], "eps": g["eps"],
               "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    first = optimizer.param_groups[0]
    return mark_switchable(bnb.optim.AdamW(groups, lr=first["lr"], betas=first["betas"], eps=first["eps"],
                                           weight_decay=first["weight_decay"], optim_bits=32,
                                           min_8bit_size=min_8bit_size))


def low_bit_min_size(optimizer: Any) -> int:
    """The smallest tensor whose moments may be 8-bit; 0 for an optimizer that keeps fp32 moments only."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return int(inner.args.min_8bit_size) if is_switchable(inner) else 0


def state_bits(optimizer: Any) -> str:
    """The form new and converted moments take now: '8bit' or 'fp32'."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return "8bit" if is_switchable(inner) and inner.args.optim_bits == 8 else "fp32"


def set_state_bits(optimizer: Any, state: str) -> int:
    """Convert every moment to ``state`` ('fp32' or '8bit') in place; future states start in it too.

    Returns the number of parameters whose state was converted."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not is_switchable(inner):
        if state == "fp32":
            return 0
        raise ValueError(
            "MemoryConfig.optimizer_state='8bit' needs the optimizer built for it: give MPOptTrainer a memory_config "
            "or MPOptArguments.optimizer_states that lists '8bit' when it is created (it then builds bitsandbytes' "
            f"AdamW), not {type(inner).__name__}."
        )
    bits = 8 if state == "8bit" else 32
    inner.args.optim_bits = bits  # states created from now on; a partial conversion below still leaves each valid
    converted = 0
    for group in inner.param_groups:
        for p in group["params"]:
            st = inner.state.get(p)
            if not st or "state1" not in st or p.numel() < inner.args.min_8bit_size:
                continue
            if bits == 8 and st["state1"].dtype == torch.float32:
                _quantize(inner, st)
                converted += 1
            elif bits == 32 and st["state1"].dtype == torch.uint8:
                _dequantize(st)
                converted += 1
    return converted


def _quantize(optimizer: Any, st: dict[str, Any]) -> None:
    functional = bitsandbytes().functional
    if "dynamic" not in optimizer.name2qmap:
        optimizer.fill_qmap()
    device = st["state1"].device
    for i, name in ((1, "dynamic"), (2, "udynamic")):
        code = optimizer.name2qmap[name] = optimizer.name2qmap[name].to(device)
        quantized, quant = functional.quantize_blockwise(st[f"state{i}"], code=code, blocksize=BLOCK)
        st[f"state{i}"], st[f"qmap{i}"], st[f"absmax{i}"] = quantized, code, quant.absmax


def _dequantize(st: dict[str, Any]) -> None:
    functional = bitsandbytes().functional
    for i in (1, 2):
        st[f"state{i}"] = functional.dequantize_blockwise(st[f"state{i}"], absmax=st[f"absmax{i}"],
                                                          code=st[f"qmap{i}"], blocksize=BLOCK).float()
    for key in _QUANT_KEYS:
        st.pop(key, None)


def adapt_loaded_state(optimizer: Any) -> int:
    """Translate moments loaded from a checkpoint of the other optimizer, in place: torch's AdamW keys
    (``exp_avg``, ``exp_avg_sq``, a tensor ``step``) into the switchable AdamW's (``state1``, ``state2``, an int), or
    the reverse (8-bit moments dequantized first), so a run resumes whether or not 8-bit state was listed before.
    Returns the number of parameters translated."""
    inner = getattr(optimizer, "optimizer", optimizer)
    translated = 0
    for p, st in list(inner.state.items()):
        if is_switchable(inner) and "exp_avg" in st:
            inner.state[p] = {"step": int(st["step"]), "state1": st["exp_avg"], "state2": st["exp_avg_sq"]}
            translated += 1
        elif not is_switchable(inner) and ("state1" in st or _NESTED in st):
            st = {**{k: v for k, v in st.items() if k != _NESTED}, **st.get(_NESTED, {})}
            if st["state1"].dtype == torch.uint8:
                _dequantize(st)
            inner.state[p] = {"step": torch.tensor(float(st["step"])), "exp_avg": st["state1"],
                              "exp_avg_sq": st["state2"]}
            translated += 1
    return translated


def state_bytes(numel: int, state: str, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of one parameter's two AdamW moments (code books not included: they are shared)."""
    if state == "8bit" and numel >= min_8bit_size:
        return 2 * numel + 2 * 4 * math.ceil(numel / BLOCK)
    return 8 * numel
