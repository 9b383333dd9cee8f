"""The causal-LM run behind ``recipes/gpt_neo_lm_online.py``: GPT-Neo retrained as the text domain shifts.

Offline default (no arguments): a 0.55 M-parameter GPT-Neo (4 layers, global/local attention, the 1024-token
byte-level BPE trained on the first domain) is pre-trained for seconds on Python's standard-library code (cached
with its tokenizer), then retrained over the docstrings and comments of those modules and over the licences and
descriptions shipped in site-packages (``lm_online.text`` says which and why), under a memory budget that the
unconstrained configuration exceeds. The metric is perplexity on each task's test blocks (lower is better).

The real job: ``--model EleutherAI/gpt-neo-125m --dataset DOMAIN ...`` (hub data set ids or local text files and
folders, one domain each; a pre-trained checkpoint gets no source pre-training, so every domain is a target).
``--random_init true`` builds GPT-Neo-125M from its public config values (no download) for real-size memory and
step-time tables.

The engine's gain metric while it races configurations: ``--gain_metric loss``, the negative mean of the model's own
``loss`` output on the probe (val) blocks.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import torch

from online_recipe import (
    QUIET_TRAINER_FLAGS,
    cached_model,
    parse_args,
    resolve_budget,
    run_and_report,
    supervised_pretrain,
)
from online_recipe.arguments import recipe_classes

from .data import DataArguments, cached_tokenizer, load_domains
from .modeling import TINY, ModelArguments, build_model, hub_tokenizer, perplexity
from .text import OFFLINE_DOMAINS

DEFAULT_TRAINING_FLAGS = [
    "--output_dir", "outputs/gpt_neo_lm_online",
    "--per_device_train_batch_size", "32",
    "--max_steps", "16",
    "--learning_rate", "1e-3",
    *QUIET_TRAINER_FLAGS,
    # the engine's search space, 8 configurations: the whole 32-block batch or halves of it, half the blocks frozen or
    # none, 0 or 2 of them checkpointed (fp32 only: bf16 autocast on a CPU is slower than fp32 for a model this small)
    "--micro_batch_sizes", "32", "16",
    "--freeze_rates", "0", "0.5",
    "--checkpoint_segments", "0", "2",
    "--trial_steps", "2",
    # the budget: 0.6 of the whole batch's predicted peak (binding: the logits of 32 x 64 tokens dominate)
    "--budget_fraction", "0.6",
    # the engine's gain while it races: the negative mean of the model's own loss on the probe (val) blocks
    "--gain_metric", "loss",
]
# reproduce/gpt_neo_lm_online.py --quick: a 2-layer GPT-Neo of width 32, a 300-token BPE, blocks of 32 tokens, 2 short
# tasks, small enough for CI (about 15 s of one core)
QUICK_FLAGS = [
    "--output_dir", "outputs/gpt_neo_lm_online_quick",
    "--num_layers", "2", "--hidden_size", "32", "--num_heads", "2", "--window_size", "8",
    "--vocab_size", "300", "--block_size", "32", "--max_chars_per_domain", "20000",
    "--train_blocks_per_task", "32", "--test_blocks_per_task", "16", "--pretrain_steps", "30",
    "--per_device_train_batch_size", "16", "--max_steps", "4",
    "--micro_batch_sizes", "16", "8", "--freeze_rates", "0", "--checkpoint_segments", "0", "1", "--trial_steps", "1",
]
TINY_NOTE = ("The tiny model (0.55 M parameters by default, pre-trained for seconds on the first domain, a 1024-token "
             "BPE) exists so that the recipe runs anywhere without a download; its perplexities are not comparable to "
             "published language-model numbers.")
OFFLINE_NOTE = ("The built-in domains are the text of this machine's Python standard library and installed packages: "
                "they change with the Python version and the installed distributions (the card's environment names "
                "the versions).")
RANDOM_NOTE = ("With --random_init the weights are random: the perplexities are not measured on the checkpoint and "
               "say nothing about it; the memory and time columns are the architecture's.")
COMMON_NOTE = ("Blocks of one document may fall in both a training and a test split (never the same tokens). "
               "Seconds depend on the machine, and so may the configurations the engine chooses, since it weighs "
               "gain per second; peaks measured on a CPU come from mpopt_hf's tracker, not from a device allocator. "
               "`--check` compares every column but the seconds.")


def limitations(model_args: ModelArguments, data_args: DataArguments) -> str:
    """The card's limitations for this run: what its model, its text and its weights can and cannot say."""
    notes = [TINY_NOTE if model_args.model == TINY else "",
             OFFLINE_NOTE if any(d in OFFLINE_DOMAINS for d in data_args.dataset) else "",
             RANDOM_NOTE if model_args.random_init else "", COMMON_NOTE]
    return " ".join(n for n in notes if n)


def parse(argv: list[str] | None = None):
    """(model, data, run, mpopt, training) arguments (a `ParsedArgs`: its ``provenance`` goes to run_and_report)."""
    return parse_args(recipe_classes(ModelArguments, DataArguments), DEFAULT_TRAINING_FLAGS, argv,
                      module=__name__)


def load_stream(model_args: ModelArguments, data_args: DataArguments):
    """``(tokenizer, source task or None, target tasks)``: the offline BPE (trained on the first domain, cached) for
    the tiny model and random weights, the checkpoint's tokenizer otherwise."""
    def tokenizer_for(first_domain):
        if model_args.offline_tokenizer:
            return cached_tokenizer(first_domain, model_args.vocab_size, model_args.source_cache("lm_online"))
        return hub_tokenizer(model_args)

    return load_domains(data_args, tokenizer_for, model_args.local_files_only,
                        with_source=model_args.pretrain_steps > 0)


def source_model(model_args: ModelArguments, data_args: DataArguments, tokenizer, source, training_args):
    """The model, pre-trained on the source domain for ``pretrain_steps`` (cached by everything it depends on)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(training_args.seed)
    if source is None:
        return build_model(model_args, tokenizer, data_args.block_size)
    key = {"model": model_args.model, "random_init": model_args.random_init,
           "shape": [model_args.num_layers, model_args.hidden_size, model_args.num_heads, model_args.window_size],
           "tokenizer": len(tokenizer), "source": source.domain, "blocks": [data_args.block_size,
                                                                            data_args.min_block_tokens],
           "source_blocks": len(source.train), "stream_seed": data_args.stream_seed,
           "steps": model_args.pretrain_steps, "lr": model_args.pretrain_lr, "batch": model_args.pretrain_batch_size,
           "seed": training_args.seed, "v": 1}

    def make():
        model = build_model(model_args, tokenizer, data_args.block_size)
        supervised_pretrain(model, source.train, model_args.pretrain_steps, model_args.pretrain_lr,
                            model_args.pretrain_batch_size, training_args)
        return model

    return cached_model(key, model_args.source_cache("lm_online"), make, AutoModelForCausalLM.from_pretrained).eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, pre-train (or load) the source model, run the stream, print the table; returns the results dict."""
    parsed = parse(argv)
    model_args, data_args, run_args, mpopt_args, training_args = parsed
    started = time.perf_counter()
    tokenizer, source, targets = load_stream(model_args, data_args)
    model = source_model(model_args, data_args, tokenizer, source, training_args).to(training_args.device)
    source_perplexity = None if source is None else perplexity(model, source.test)
    budget, unconstrained = resolve_budget(model, targets[0].train, run_args, mpopt_args, training_args)
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"gpt_neo_lm_online: model={model_args.model}" + (" (random weights)" if model_args.random_init else "")
        + f", {parameters / 1e6:.2f} M parameters, {config.num_hidden_layers} layers "
        f"{getattr(config, 'attention_layers', '')}, vocabulary {len(tokenizer)} | blocks of {data_args.block_size} "
        f"tokens | " + (f"source {source.name} ({len(source.train)} blocks, {model_args.pretrain_steps} steps, "
                        f"test perplexity {source_perplexity:.2f}) -> " if source is not None else "")
        + f"{len(targets)} tasks: {', '.join(f'{t.name} ({len(t.train)} blocks)' for t in targets)} | "
        f"baseline={run_args.baseline} | effective batch {training_args.per_device_train_batch_size} x "
        f"{training_args.max_steps} steps/task, lr {training_args.learning_rate:g} | budget {budget:.2f} MiB"
        + (f" (unconstrained step predicted at {unconstrained:.2f} MiB)" if unconstrained else "")
    )
    arguments = {"model": asdict(model_args), "data": asdict(data_args), "run": asdict(run_args)}
    extra = {"source_perplexity": source_perplexity, "source_domain": None if source is None else source.name,
             "parameters": parameters, "vocabulary": len(tokenizer)}
    return run_and_report(model, targets, run_args, mpopt_args, training_args, budget=budget,
                          unconstrained=unconstrained, started=started, arguments=arguments,
                          provenance=parsed.provenance, extra_summary=extra, evaluate_fn=perplexity,
                          metric_name="perplexity", higher_is_better=False, pipeline_tag="text-generation",
                          limitations=limitations(model_args, data_args))


__all__ = ["DEFAULT_TRAINING_FLAGS", "TINY", "limitations", "load_stream", "main", "parse", "source_model"]
