"""GPT-Neo for the causal-LM recipe: the tiny offline model, GPT-Neo-125M's architecture from its public config,
a checkpoint from the hub or a folder, and perplexity, the recipe's metric.

The tiny model keeps what makes GPT-Neo GPT-Neo at a size that trains in seconds on a CPU: alternating global and
local (sliding-window) attention layers, learned positions, tied embeddings. Its defaults (4 layers of width 96,
4 heads, window 16, the 1024-token offline BPE) give 0.55 M parameters: a step of 32 blocks of 64 tokens costs about
a sixth of a CPU second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mpopt_hf.config import check_bool, check_int
from online_recipe import check_model_path
from online_recipe.arguments import HubModelArguments

TINY = "tiny-gpt-neo"
GPT_NEO_125M_ID = "EleutherAI/gpt-neo-125m"
# EleutherAI/gpt-neo-125m's config.json, as published: --random_init builds it without a download
GPT_NEO_125M = {
    "vocab_size": 50257, "max_position_embeddings": 2048, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
    "attention_types": [[["global", "local"], 6]], "window_size": 256, "intermediate_size": None,
    "activation_function": "gelu_new", "embed_dropout": 0.0, "attention_dropout": 0.0, "resid_dropout": 0.0,
    "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "bos_token_id": 50256, "eos_token_id": 50256,
    "tie_word_embeddings": True,
}
TINY_DEFAULTS = {"num_layers": 4, "hidden_size": 96, "num_heads": 4, "window_size": 16}


@dataclass
class ModelArguments(HubModelArguments):
    model: str = field(
        default=TINY,
        metadata={"help": f"'{TINY}' (built offline, pre-trained for seconds on the first domain), a GPT-Neo hub id "
                  f"such as {GPT_NEO_125M_ID} or a local folder of a causal LM."},
    )
    random_init: bool = field(
        default=False,
        metadata={"help": f"Build --model's architecture from its config with random weights ({GPT_NEO_125M_ID}: "
                  "from its public config values written in the code, no download): memory and step time at real "
                  "size; its perplexities say nothing about the checkpoint."},
    )
    num_layers: int | None = field(default=None, metadata={"help": f"{TINY}: layers (even: global/local pairs). "
                                                           f"None: {TINY_DEFAULTS['num_layers']}."})
    hidden_size: int | None = field(default=None, metadata={"help": f"{TINY}: width. None: "
                                                            f"{TINY_DEFAULTS['hidden_size']}."})
    num_heads: int | None = field(default=None, metadata={"help": f"{TINY}: attention heads. None: "
                                                          f"{TINY_DEFAULTS['num_heads']}."})
    window_size: int | None = field(default=None, metadata={"help": f"{TINY}: local attention window, tokens. None: "
                                                            f"{TINY_DEFAULTS['window_size']}."})
    vocab_size: int = field(
        default=1024, metadata={"help": f"The offline byte-level BPE's vocabulary ({TINY} and --random_init)."}
    )
    pretrain_steps: int | None = field(
        default=None, metadata={"help": f"Steps on the source (first) domain. None: 150 for {TINY}, 0 else (then "
                                "every domain is a target)."}
    )
    pretrain_lr: float = field(default=3e-3, metadata={"help": "Learning rate of the source pre-training."})
    pretrain_batch_size: int = field(default=32, metadata={"help": "Blocks per step of the source pre-training."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where the source model and its tokenizer are cached. None: "
                                "~/.cache/mpopt_hf/lm_online."}
    )

    def __post_init__(self) -> None:
        where = "ModelArguments."
        self.check_model("model (--model)", f"{TINY!r}, a hub id (org/name) or a local folder")
        check_bool(where + "random_init", self.random_init)
        for name, default in TINY_DEFAULTS.items():
            value = check_int(where + name, getattr(self, name), lambda v: v >= 1, "an int >= 1 or None",
                              optional=True)
            if value is not None and self.model != TINY:
                raise ValueError(f"ModelArguments.{name} {value}: --{name} shapes the {TINY!r} model only; "
                                 f"--model {self.model} has its own config.")
            setattr(self, name, default if value is None and self.model == TINY else value)
        if self.model == TINY:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"ModelArguments.hidden_size {self.hidden_size} must be a multiple of num_heads "
                                 f"{self.num_heads}.")
            if self.num_layers % 2:
                raise ValueError(f"ModelArguments.num_layers {self.num_layers} must be even: GPT-Neo's layers "
                                 "alternate global and local attention in pairs.")
            if self.random_init:
                raise ValueError(f"ModelArguments.random_init: {TINY!r} is always built from its config; "
                                 f"--random_init builds a hub model's architecture (e.g. {GPT_NEO_125M_ID}).")
        else:
            self._check_model_path()
        self.vocab_size = check_int(where + "vocab_size", self.vocab_size, lambda v: 260 <= v <= 50257,
                                    "an int in 260..50257 (256 bytes, the end-of-text token and merges)")
        self.check_pretraining(150 if self.model == TINY else 0)

    def _check_model_path(self) -> None:
        """A local path must exist (a folder with config.json); only a well-formed hub id goes on."""
        if self.random_init and self.model == GPT_NEO_125M_ID:
            return
        expected = (f"a folder with config.json (and, without --random_init, the weights and tokenizer) of a causal "
                    f"LM, a hub id such as {GPT_NEO_125M_ID} (in the local Hugging Face cache, or "
                    f"--local_files_only false to download), or {TINY!r}")
        check_model_path(self.model, expected, "ModelArguments.model (--model)")

    @property
    def offline_tokenizer(self) -> bool:
        """True when the tokenizer is the offline BPE (the tiny model, or random weights: no checkpoint's vocab)."""
        return self.model == TINY or self.random_init


def tiny_config(args: ModelArguments, vocab_size: int, max_positions: int, eos_id: int):
    from transformers import GPTNeoConfig

    return GPTNeoConfig(
        vocab_size=vocab_size, max_position_embeddings=max_positions, hidden_size=args.hidden_size,
        num_layers=args.num_layers, num_heads=args.num_heads,
        attention_types=[[["global", "local"], args.num_layers // 2]], window_size=args.window_size,
        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, bos_token_id=eos_id, eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def gpt_neo_125m_config():
    """GPT-Neo-125M's architecture from its public config values (no download)."""
    from transformers import GPTNeoConfig

    return GPTNeoConfig(**GPT_NEO_125M)


def build_model(args: ModelArguments, tokenizer, block_size: int):
    """The model of ``args`` (tiny: random weights, sized to ``tokenizer``; --random_init: the architecture only;
    else the checkpoint). Its vocabulary must hold every id of ``tokenizer``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.model == TINY:
        model = AutoModelForCausalLM.from_config(tiny_config(args, len(tokenizer), max(block_size, 64),
                                                             tokenizer.eos_token_id))
    elif args.random_init:
        config = gpt_neo_125m_config() if args.model == GPT_NEO_125M_ID else AutoConfig.from_pretrained(
            args.model, local_files_only=args.local_files_only)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=args.local_files_only)
    positions = getattr(model.config, "max_position_embeddings", block_size)
    if block_size > positions:
        raise ValueError(f"DataArguments.block_size {block_size} exceeds {args.model}'s {positions} positions.")
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens, more than {args.model}'s vocabulary of "
                         f"{model.config.vocab_size}; lower --vocab_size.")
    return model


def hub_tokenizer(args: ModelArguments):
    """The checkpoint's own tokenizer; its end-of-text token pads (padded positions carry no label)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=args.local_files_only)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------- the metric


@torch.no_grad()
def perplexity(model, dataset, batch_size: int = 64) -> float:
    """exp(mean next-token cross-entropy) over every labelled token of ``dataset`` (labels -100 are padding):
    the recipe's metric, lower is better; inf when the mean loss overflows exp."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = dataset.with_format("torch")
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        rows = data[start:start + batch_size]
        logits = model(input_ids=rows["input_ids"].to(device), attention_mask=rows["attention_mask"].to(device)).logits
        labels = rows["labels"].to(device)[:, 1:]
        total += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: the data hold no labelled token (every label is -100).")
    mean = total / count
    return math.exp(mean) if mean < 700 else math.inf

