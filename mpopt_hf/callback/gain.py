"""The gain metric: what a trial's configuration bought, scored on evaluation data (higher is better).

Plain functions score logits; `GainMeter` runs the evaluation loop, halving its own evaluation batch on
out-of-memory (the training configuration is not touched). A model whose output has no classification logits
(contrastive CLIP, a causal LM, SAM, any model a Trainer trains by its ``loss``) is scored by the negative of its
own loss on the evaluation data (``"loss"``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..training.microbatch import batch_size_of, split_batch
from ..training.oom import free_memory, is_out_of_memory


def item_scores(logits: torch.Tensor, labels: torch.Tensor | None, metric: str) -> torch.Tensor:
    """The gain metric of every item (higher is better). Causal-LM logits are shifted by one."""
    logits = logits.detach().float()
    if logits.dim() == 3:  # [batch, tokens, vocab]: next-token prediction
        logits = logits[:, :-1]
        labels = None if labels is None else labels[:, 1:]
    flat = logits.reshape(-1, logits.shape[-1])
    # a non-finite output knows nothing: it scores as a uniform prediction (and is never right), the worst value
    broken = ~torch.isfinite(flat).all(-1)
    flat = torch.where(broken[:, None], torch.zeros_like(flat), flat)
    if metric == "val_accuracy":
        if labels is None:
            raise ValueError("gain_metric='val_accuracy' needs labels in the evaluation data; use 'entropy' or 'confidence'.")
        target = labels.reshape(-1)
        keep = target != -100
        return ((flat.argmax(-1) == target) & ~broken)[keep].double()
    probs = flat.softmax(-1)
    if metric == "entropy":  # lower entropy is better: its negative
        return (probs * probs.clamp_min(1e-12).log()).sum(-1).double()
    if metric == "confidence":
        return probs.max(-1).values.double()
    raise ValueError(f"Unknown gain metric {metric!r}; allowed: 'val_accuracy', 'entropy', 'confidence'.")


# the best value of each gain metric's item score: the engine caps its projections there
METRIC_CEILING = {"val_accuracy": 1.0, "confidence": 1.0, "entropy": 0.0, "loss": 0.0, "train_loss": 0.0}
# metrics that need no labels: a jump of one between two measurements may be drift (the engine re-opens its search)
PROXY_METRICS = ("entropy", "confidence")
LOGIT_METRICS = ("val_accuracy", "entropy", "confidence")


def metric_from_logits(logits: torch.Tensor, labels: torch.Tensor | None, metric: str) -> tuple[float, int]:
    """(sum of the per-item score, item count); higher is better."""
    scores = item_scores(logits, labels, metric)
    return float(scores.sum()), int(scores.numel())


def resolve_metric(metric: str, example: dict[str, Any] | None) -> str:
    """The metric 'auto' means from an evaluation row alone (before the model's output is known)."""
    if metric != "auto":
        return metric
    return "val_accuracy" if example is not None and ("labels" in example or "label" in example) else "entropy"


def _labels_of(batch: dict[str, Any]) -> Any:
    return batch.get("labels", batch.get("label"))


def resolve_for_output(metric: str, batch: dict[str, Any], output: Any) -> str:
    """The metric to use given one evaluation batch and the model's output on it.

    'auto': accuracy when the output has classification logits ``[batch, classes]`` and the batch has labels,
    entropy when it has such logits and no labels, else the model's own loss. An explicit logit metric on a model
    without classification logits, or 'loss' on one that returns none, is refused naming what the output holds."""
    logits = _get(output, "logits")
    labels = _labels_of(batch)
    classifies = torch.is_tensor(logits) and logits.dim() == 2
    loss = _get(output, "loss")
    if metric == "auto":
        if classifies:
            return "val_accuracy" if torch.is_tensor(labels) and labels.dim() == 1 else "entropy"
        metric = "loss"
    keys = list(output.keys()) if hasattr(output, "keys") else type(output).__name__
    if metric == "loss" and not torch.is_tensor(loss):
        raise ValueError(
            f"gain_metric='loss' scores the model's own loss on the evaluation data, but its output has none (it "
            f"holds {keys}): give evaluation rows with the inputs the loss needs (labels, or return_loss=True for "
            f"CLIP), or a gain_metric from {list(LOGIT_METRICS)} for a model with classification logits.")
    if metric in LOGIT_METRICS and not torch.is_tensor(logits):
        raise ValueError(
            f"gain_metric={metric!r} scores classification logits, but the model's output has no 'logits' (it holds "
            f"{keys}); use gain_metric='loss' (its own loss on the evaluation data) or 'auto'.")
    return metric


def _get(output: Any, name: str) -> Any:
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)


PROBE_ROWS = 256  # training rows scored as the gain metric when no evaluation data is given


class GainMeter:
    """Scores a model on evaluation data with ``metric``; ``eval_chunk`` is the evaluation batch it fell back
    to after an out-of-memory error (None: the loader's)."""

    def __init__(self, metric: str, eval_chunk: int | None = None) -> None:
        self.metric = metric
        self.eval_chunk = eval_chunk
        self._probe: tuple[Any, Any] | None = None  # (training data, its first rows) when no eval data is given

    def eval_data(self, trainer: Any, fallback: Any) -> Any:
        """The trainer's eval_dataset, else ``fallback`` (the callback's), else the first `PROBE_ROWS` rows of the
        training data: a user without a probe set still gets a gain signal (how well the model fits what it
        trains on, which rises as training gains), with a warning that says so."""
        data = trainer.eval_dataset if trainer is not None and trainer.eval_dataset is not None else None
        data = data if data is not None else fallback
        if data is None and trainer is not None and getattr(trainer, "train_dataset", None) is not None:
            data = self._train_probe(trainer.train_dataset)
        if data is None:
            raise ValueError(
                "MPOptCallback needs evaluation data for the gain metric: give the Trainer an eval_dataset (labelled "
                "for gain_metric='val_accuracy', unlabelled for 'entropy'/'confidence') or MPOptCallback(eval_dataset=...)."
            )
        return data

    def _train_probe(self, train_dataset: Any) -> Any:
        """The first `PROBE_ROWS` rows of ``train_dataset``, selected (and warned about) once per dataset."""
        if self._probe is None or self._probe[0] is not train_dataset:
            n = min(PROBE_ROWS, len(train_dataset))
            warnings.warn(
                f"MPOptCallback: no eval_dataset, so the gain metric scores the first {n} training rows (how well "
                "the model fits what it trains on); pass eval_dataset=... for a held-out signal.", stacklevel=3)
            select = getattr(train_dataset, "select", None)
            rows = select(range(n)) if callable(select) else torch.utils.data.Subset(train_dataset, range(n))
            self._probe = (train_dataset, rows)
        return self._probe[1]

    def resolve(self, requested: str, model: nn.Module, trainer: Any, fallback: Any) -> str:
        """Set and return the metric for ``requested`` (see `resolve_for_output`), from the model's output on the
        first evaluation batch (a couple of rows, without gradients). Without evaluation data, 'auto' is the
        training loss where the trainer reports it (`MPOptTrainer`)."""
        reports_loss = hasattr(trainer, "last_step_loss")
        has_eval = fallback is not None or getattr(trainer, "eval_dataset", None) is not None
        if requested == "train_loss" or (requested == "auto" and not has_eval and reports_loss):
            if not reports_loss:
                raise ValueError("gain_metric='train_loss' reads the loss of each training step, which only "
                                 "MPOptTrainer reports; give a plain Trainer an eval_dataset and another gain_metric.")
            self.metric = "train_loss"
            return self.metric
        batch = next(iter(self._loader(trainer, fallback)), None)
        if batch is None:
            self.metric = resolve_metric(requested, None)
            return self.metric
        device = next(model.parameters()).device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        part = split_batch(batch, 2)[0]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = model(**self._inputs(part, requested))
        finally:
            model.train(was_training)
        self.metric = resolve_for_output(requested, part, output)
        return self.metric

    def _inputs(self, part: dict[str, Any], metric: str) -> dict[str, Any]:
        """What the model is called with: everything for its loss ('loss', 'auto'), else all but the labels."""
        if metric in ("loss", "auto"):
            return dict(part)
        return {k: v for k, v in part.items() if k not in ("labels", "label")}

    def _loader(self, trainer: Any, fallback: Any) -> Any:
        data = self.eval_data(trainer, fallback)
        if trainer is not None:
            return trainer.get_eval_dataloader(data)
        return torch.utils.data.DataLoader(data, batch_size=8, collate_fn=_default_collate)

    def measure(self, model: nn.Module, trainer: Any, fallback: Any,
                reduce_sums: Callable[[torch.Tensor], list[float]]) -> tuple[float, float]:
        """(mean score, its standard error) over the evaluation data and, through ``reduce_sums``, all ranks.

        The standard error is over items; for 'loss', whose items the model averages itself, over the evaluation
        batches (each batch's mean loss one observation, weighted by its rows)."""
        loader = self._loader(trainer, fallback)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # score, squared score, items, observations
        try:
            with torch.no_grad():
                for batch in loader:
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    sums += self.score_batch(model, batch)
        finally:
            model.train(was_training)
        total, squares, count, observations = reduce_sums(sums)
        mean = total / max(count, 1)
        # and its standard error: the engine counts smaller leads as ties
        return mean, math.sqrt(max(squares / max(count, 1) - mean * mean, 0.0) / max(observations, 1))

    def score_batch(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(sum of scores, sum of squared scores, items, observations) of one evaluation batch."""
        size = batch_size_of(batch)
        chunk = min(self.eval_chunk or size, size)
        while True:
            try:
                sums = torch.zeros(4, dtype=torch.float64)
                for part in split_batch(batch, chunk):
                    sums += self._score_part(model, part)
                if self.metric == "loss":
                    sums[3] = 1.0  # one observation per evaluation batch, however it was chunked
                return sums
            except Exception as exc:  # noqa: BLE001
                if not is_out_of_memory(exc) or chunk <= 1:
                    raise
            free_memory()
            chunk = max(1, chunk // 2)
            self.eval_chunk = chunk  # evaluation only: the training configuration is not touched


    def _score_part(self, model: nn.Module, part: dict[str, Any]) -> torch.Tensor:
        output = model(**self._inputs(part, self.metric))
        if self.metric == "loss":
            rows = float(batch_size_of(part))
            loss = float(output.loss.detach().float())
            loss = loss if math.isfinite(loss) else float("inf")  # a broken model scores as the worst
            score = -min(loss, 1e30)
            return torch.tensor([score * rows, score * score * rows, rows, 0.0], dtype=torch.float64)
        scores = item_scores(output.logits, _labels_of(part), self.metric).cpu()
        count = float(scores.numel())
        return torch.stack([scores.sum(), (scores * scores).sum(), torch.tensor(count), torch.tensor(count)])


def _default_collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}


__all__ = ["METRIC_CEILING", "PROXY_METRICS", "GainMeter", "item_scores", "metric_from_logits", "resolve_for_output",
           "resolve_metric"]
