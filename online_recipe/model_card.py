"""Model cards of the online-retraining recipes, built with huggingface_hub's `ModelCard`, and the check that a card's
per-task table is the one its results render.

A card is made from a run's results (an `OnlineResult` or the ``results.json`` dict) and the run's arguments:
YAML metadata (library, tags, data set, a model-index with the stream's mean metric before and after retraining:
accuracy, or what the run's ``evaluate_fn`` measured, e.g. perplexity) and a markdown body (what was run and the
command that reproduces it, the per-task table, the environment, the limitations). A card names its metric and says
which way is better; results written before the metric hook are accuracy. One function renders the per-task table
(:func:`render_table`) for the card and for the reproduce scripts; :func:`check_card` parses a card's table back and
names the rows that differ from a fresh rendering. ``reproduce/*.py`` are thin scripts over
:func:`online_recipe.reproduce.reproduce_main`.
"""

from __future__ import annotations

import platform
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mpopt_hf.report import stream_metric, summary_scores, task_scores

CARD_NAME = "README.md"
TAGS = ("mpopt_hf", "online-learning", "domain-shift", "memory-budget")
DEFAULT_PIPELINE_TAG = "image-classification"  # what a run that recorded none (every run before the LM recipe) was
# recipe module -> (the script a user launches, the script that regenerates its card)
RECIPES = {
    "clip_online.run": ("recipes/clip_cls_online.py", "reproduce/clip_cls_online.py"),
    "cnn_online.run": ("recipes/cnn_retrain.py", "reproduce/cnn_retrain_digits.py"),
    "lm_online.run": ("recipes/gpt_neo_lm_online.py", "reproduce/gpt_neo_lm_online.py"),
    "vit_online.run": ("recipes/vit_cls_online.py", "reproduce/vit_cls_online.py"),
    "sam_online.run": ("recipes/sam_seg_online.py", "reproduce/sam_seg_online.py"),
}
# the metric cells of a run whose model had random weights (summary["random_weights"], vit_cls_online --random_init)
NOT_MEASURED = "not measured (random weights)"
BASELINES = {
    "mpopt": "mpopt_hf's rule engine chooses the memory configuration online, within the budget",
    "none": "the source model, never adapted",
    "fixed": "one fixed memory configuration for the whole stream",
    "auto_find_batch_size": "transformers' auto_find_batch_size: halve the batch until it fits",
    "full_checkpointing": "every block checkpointed, the largest micro-batch that fits",
}
TRAINING_FIELDS = ("per_device_train_batch_size", "max_steps", "num_train_epochs", "learning_rate", "seed")
LIMITATIONS = (
    "The offline defaults (a tiny randomly initialised CLIP, or a narrow ResNet pre-trained for seconds, on "
    "scikit-learn's 8x8 digits and digit domains rendered from them) exist so that a recipe runs anywhere without a "
    "download; their accuracies are not comparable to published numbers on CIFAR-10-C, MNIST-M, SVHN or USPS. "
    "Seconds depend on the machine (CPU or GPU, threads, other load), and so may the configurations the engine "
    "chooses, since it weighs gain per second; peaks measured on a CPU come from mpopt_hf's tracker, not from a "
    "device allocator. `--check` compares every column but the seconds. Corruption severities are the published "
    "CIFAR-10-C rows unless the stream row says `monotone` (rows whose distance from the clean image grows at every "
    "severity, the table of runs made before issue #15); the images are rendered by `vision`'s own code, not the "
    "reference scripts."
)  # the image recipes'; a run that records its own (summary["limitations"]) gets those


# ---------------------------------------------------------------------------- what a run records for its card


def provenance(module: str | None, argv: Sequence[str] | None) -> dict[str, str | None]:
    """``{"recipe", "command"}``: the recipe script of ``module`` and the command line that runs it with ``argv``."""
    if module is None or argv is None:
        return {"recipe": None, "command": None}
    script = RECIPES[module][0] if module in RECIPES else sys.argv[0]
    return {"recipe": script, "command": shlex.join(["python", script, *argv])}


def training_facts(training_args) -> dict[str, Any]:
    """The retraining figures a card states, from `TrainingArguments`."""
    return {name: getattr(training_args, name) for name in TRAINING_FIELDS}


def environment(device) -> dict[str, Any]:
    """Versions, device, CPU/GPU name and threads of this process: what the card's timings depend on."""
    import huggingface_hub
    import torch
    import transformers

    device = torch.device(device)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu": _cpu_name(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------- the per-task table


def _number(digits: int) -> Callable[[Any], str]:
    return lambda value: "-" if value is None else f"{value:.{digits}f}"


def _configs(configs: Sequence[dict[str, Any]] | None) -> str:
    from mpopt_hf.config import MemoryConfig

    return " -> ".join(MemoryConfig.from_dict(c).short() for c in configs or []) or "-"


def _within(task: dict[str, Any]) -> str:
    peak, budget = task.get("measured_peak_mib"), task.get("budget_mib")
    return "-" if peak is None or budget is None else ("yes" if peak <= budget else "no")


def columns(metric: str = "accuracy") -> dict[str, Callable[[dict[str, Any]], str]]:
    """Header -> cell of a task record of a stream scored by ``metric``; the metric's values are compared to 3
    decimals, seconds not at all (they vary)."""
    return {
        "task": lambda t: str(t["task"]),
        f"{metric} before": lambda t: _number(3)(task_scores(t).before),
        f"{metric} after": lambda t: _number(3)(task_scores(t).after),
        "configurations": lambda t: _configs(t.get("configs")),
        "predicted peak MiB": lambda t: _number(2)(t.get("predicted_peak_mib")),
        "measured peak MiB": lambda t: _number(2)(t.get("measured_peak_mib")),
        "budget MiB": lambda t: _number(2)(t.get("budget_mib")),
        "within budget": _within,
        "seconds": lambda t: _number(1)(t.get("seconds")),
    }


COLUMNS = columns()  # an accuracy stream's: the table of every card written before the metric hook
ACCURACY_COLUMNS = ("accuracy before", "accuracy after")
UNCHECKED_COLUMNS = ("seconds",)


def _is_metric_column(header: str) -> bool:
    return header.endswith((" before", " after"))


def table_rows(tasks: Sequence[dict[str, Any]], random_weights: bool = False) -> list[dict[str, str]]:
    """One ``{header: cell}`` row per task record, in stream order; the headers name the stream's metric. With
    ``random_weights`` the metric cells say ``NOT_MEASURED``: an untrained network's scores mean nothing."""
    cells = columns(stream_metric(tasks).metric)
    rows = [{header: cell(task) for header, cell in cells.items()} for task in tasks]
    for row in rows if random_weights else []:
        row.update({header: NOT_MEASURED for header in row if _is_metric_column(header)})
    return rows


def render_table(tasks: Sequence[dict[str, Any]], random_weights: bool = False) -> str:
    """The per-task markdown table of the card and of the reproduce scripts (numbers right-aligned)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |"

    header = list(columns(stream_metric(tasks).metric))
    align = ["---" if h in ("task", "configurations", "within budget") else "---:" for h in header]
    rows = table_rows(tasks, random_weights)
    return "\n".join([line(header), line(align), *(line(list(r.values())) for r in rows)])


def parse_table(markdown: str, metric: str | None = None) -> list[dict[str, str]]:
    """The rows of the per-task table in ``markdown`` (a card's body), as :func:`table_rows` makes them; the table
    is that of ``metric``, or (None) of the metric its header names."""
    def cells(line: str) -> list[str]:
        return [c.strip().replace(r"\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]

    def header_of(text: str) -> list[str] | None:
        found = cells(text)
        if len(found) < 2 or found[0] != "task" or not found[1].endswith(" before"):
            return None
        expected = list(columns(found[1].removesuffix(" before") if metric is None else metric))
        return expected if found == expected else None

    lines = markdown.splitlines()
    for start, text in enumerate(lines):
        if text.startswith("|") and (header := header_of(text)) is not None:
            break
    else:
        raise ValueError(f"No per-task table found: expected a markdown table with the columns "
                         f"{list(columns(metric or 'METRIC'))}.")
    rows = []
    for text in lines[start + 2:]:
        if not text.startswith("|"):
            break
        values = cells(text)
        if len(values) != len(header):
            raise ValueError(f"A row of the per-task table has {len(values)} cells, expected {len(header)}: {text!r}")
        rows.append(dict(zip(header, values)))
    return rows


def diff_tables(expected: Sequence[dict[str, str]], found: Sequence[dict[str, str]]) -> list[str]:
    """What differs between a freshly rendered table (``expected``) and a card's (``found``), one line per task and
    column; the metric to 3 decimals, seconds not compared. Empty: the tables agree."""
    def same(header: str, a: str, b: str) -> bool:
        if _is_metric_column(header):
            try:
                return round(float(a), 3) == round(float(b), 3)
            except ValueError:
                pass
        return a == b

    run, card = {r["task"]: r for r in expected}, {r["task"]: r for r in found}
    differences = [f"task {t!r}: in the run, missing from the card" for t in run if t not in card]
    differences += [f"task {t!r}: in the card, not in the run" for t in card if t not in run]
    headers = list((list(expected) or list(found) or [{}])[0])
    for task in (t for t in run if t in card):
        for header in headers:
            if header not in UNCHECKED_COLUMNS and not same(header, run[task][header], card[task][header]):
                differences.append(f"task {task!r}: {header} is {card[task][header]} in the card, "
                                   f"{run[task][header]} in the run")
    return differences


# ---------------------------------------------------------------------------- the card


def results_dict(result) -> dict[str, Any]:
    """The ``results.json`` dict of an `OnlineResult` (a dict is returned as it is)."""
    return result if isinstance(result, dict) else result.to_dict()


def build_card(result, arguments: dict[str, Any] | None = None, *, recipe: str | None = None,
               command: str | None = None, env: dict[str, Any] | None = None):
    """The `ModelCard` of a run: ``result`` (an `OnlineResult` or its dict) and the run's ``arguments`` (the recipe's
    ``{"model": ..., "data": ..., "run": ..., "training": ...}``); each left out is read from the result's summary,
    where the recipes record it."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = results_dict(result)
    tasks, summary = results["tasks"], results["summary"]
    arguments = arguments if arguments is not None else summary.get("arguments") or {}
    recipe = recipe or summary.get("recipe")
    command = command or summary.get("command")
    env = env if env is not None else summary.get("environment")
    model = arguments.get("model", {}).get("model", "unknown")
    datasets = arguments.get("data", {}).get("dataset", "unknown")  # a name, or a list of domains (one per entry)
    datasets = [str(d) for d in datasets] if isinstance(datasets, (list, tuple)) else [str(datasets)]
    dataset = "+".join(Path(d).name or d for d in datasets)
    baseline = summary.get("baseline", "unknown")
    scores = summary_scores(summary)
    pipeline_tag = summary.get("pipeline_tag") or DEFAULT_PIPELINE_TAG
    name = f"{Path(recipe).stem if recipe else 'online'}-{Path(model).name}-{dataset}-{baseline}"
    stream = ", ".join(str(t["task"]) for t in tasks)
    random_weights = bool(summary.get("random_weights"))
    evals = [] if random_weights else [
        EvalResult(task_type=pipeline_tag, dataset_type=dataset, dataset_name=f"{dataset}: {stream}",
                   dataset_split="test", metric_type=scores.metric,
                   metric_name=f"mean {scores.metric} {when} retraining", metric_value=float(value))
        for when, value in (("before", scores.before), ("after", scores.after))
    ]
    data = ModelCardData(library_name="transformers", pipeline_tag=pipeline_tag, metrics=[scores.metric],
                         tags=[*TAGS, pipeline_tag, f"baseline-{baseline}"], datasets=datasets, model_name=name,
                         eval_results=evals or None)
    body = "\n\n".join([
        f"# {name}",
        (f"`{model}` retrained online over a stream of {len(tasks)} domain-shifted tasks of `{dataset}` under a "
         "memory budget, with mpopt_hf choosing how each step uses memory (micro-batch, frozen blocks, activation "
         "checkpointing, precision)."),
        _what_was_run(summary, arguments, recipe, command, model, dataset, stream),
        "## Results per task",
        render_table(tasks, random_weights),
        f"Mean {scores.metric} over the stream: {NOT_MEASURED}." if random_weights else _means(summary),
        "## Environment",
        _environment_lines(env),
        "## Limitations",
        summary.get("limitations") or LIMITATIONS,
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _table(arguments) -> str:
    table = (arguments.get("data") or {}).get("corruption_table")
    return "" if table in (None, "published") else f"; severity table `{table}`"


def _what_was_run(summary, arguments, recipe, command, model, dataset, stream) -> str:
    training = arguments.get("training") or {}
    width = arguments.get("model", {}).get("width_multiplier")
    steps = None
    if training:
        count, unit = ((training["max_steps"], "step") if training.get("max_steps", -1) > 0
                       else (training["num_train_epochs"], "epoch"))
        steps = f"{count:g} {unit}" + ("" if count == 1 else "s")
    rows = [
        ("recipe", f"`{recipe}`" if recipe else "not recorded"),
        ("model", f"`{model}`" + (f" (width x{width:g})" if width not in (None, 1.0) else "")
         + (" with random weights (its architecture, none of its weights)" if summary.get("random_weights") else "")),
        ("data set, stream", f"`{dataset}`: {stream}" + _source(summary) + _table(arguments)),
        ("budget", _budget(summary)),
        ("baseline", f"`{summary.get('baseline')}`: {BASELINES.get(summary.get('baseline'), '')}"),
        ("retraining", "not recorded" if not training else
         f"effective batch {training['per_device_train_batch_size']}, {steps} per task, learning rate "
         f"{training['learning_rate']:g}, seed {training['seed']}"),
        ("run time", "not recorded" if summary.get("run_seconds") is None else f"{summary['run_seconds']:.0f} s"),
    ]
    table = "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])
    reproduce = next((again for script, again in RECIPES.values() if script == recipe), None)
    how = [f"The command that reproduces it:\n\n```bash\n{command}\n```" if command else "Command: not recorded."]
    if reproduce:
        how.append(f"Check this card's table against the run's results: `python {reproduce} --from_results "
                   f"results.json --check {CARD_NAME}` (without `--from_results` it runs the recipe's offline "
                   "default again; see reproduce/README.md).")
    return "\n\n".join(["## What was run", table, *how])


def _budget(summary: dict[str, Any]) -> str:
    budget, full = summary.get("budget_mib"), summary.get("unconstrained_predicted_peak_mib")
    if budget is None:
        return "none"
    text = f"{budget:.2f} MiB"
    if full:
        text += f" (the whole batch with no knob is predicted at {full:.2f} MiB)"
    if summary.get("max_measured_peak_mib") is not None:
        text += (f"; highest measured peak {summary['max_measured_peak_mib']:.2f} MiB, within budget: "
                 f"{'yes' if summary['within_budget'] else 'no'}")
    return text


def _source(summary: dict[str, Any]) -> str:
    """`` (source perplexity 12.345)``: the source model's own score (``summary["source_<metric>"]``, the metric's
    name as it is or in lower case), if recorded."""
    metric = summary_scores(summary).metric
    value = summary.get(f"source_{metric}", summary.get(f"source_{metric.lower()}"))
    return "" if value is None else f" (source {metric} {value:.3f})"


def _means(summary: dict[str, Any]) -> str:
    scores = summary_scores(summary)
    text = (f"Mean {scores.metric} over the stream: {scores.before:.3f} before retraining, {scores.after:.3f} after "
            f"({scores.after - scores.before:+.3f}" + ("" if scores.metric == "accuracy" else f"; {scores.direction}")
            + ").")
    if summary.get("mce") is not None:
        text += f" mCE {summary['mce']:.3f} (reference: {summary.get('mce_reference')})."
    return text


def _environment_lines(env: dict[str, Any] | None) -> str:
    if not env:
        return "Not recorded."
    versions = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "transformers", "huggingface_hub") if k in env)
    processor = f"GPU {env['gpu']}" if env.get("gpu") else f"CPU {env.get('cpu')}"
    threads = env.get("torch_threads")
    device = f"- device `{env.get('device')}`: {processor}, {threads} torch thread{'' if threads == 1 else 's'}"
    return "\n".join([f"- {versions}", device, f"- {env.get('platform')}"])


def write_card(result, path: str | Path, arguments: dict[str, Any] | None = None, **recorded) -> Path:
    """Build the card (:func:`build_card`) and write it atomically to ``path`` (a recipe: ``output_dir/README.md``)."""
    from mpopt_hf.report import atomic_write_bytes

    return atomic_write_bytes(path, str(build_card(result, arguments, **recorded)).encode("utf-8"))


def check_card(result, card_path: str | Path) -> list[str]:
    """The differences between ``result``'s table and the card at ``card_path`` (empty: they agree)."""
    from huggingface_hub import ModelCard

    # ModelCard(text), never ModelCard.load: a path that does not exist would be taken for a hub id and downloaded
    card = ModelCard(Path(card_path).read_text(encoding="utf-8"))
    tasks = results_dict(result)["tasks"]
    random_weights = bool(results_dict(result)["summary"].get("random_weights"))
    return diff_tables(table_rows(tasks, random_weights), parse_table(card.text, stream_metric(tasks).metric))

