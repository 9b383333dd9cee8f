"""Accuracy: the share of predictions equal to their references (optionally weighted).

A local copy of the metric so that `evaluate.load(path)` works with no hub.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy = correct predictions / all predictions, in [0, 1]."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    sample_weight (list of float, optional): per-sample weights.
    normalize (bool, default True): False returns the (weighted) count of correct predictions.
Returns:
    accuracy (float)
Examples:
    >>> metric = evaluate.load("mpopt_hf/metrics/accuracy/accuracy.py")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"]
    0.6666666666666666
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, sample_weight=None, normalize=True):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"accuracy: {predictions.shape[0]} predictions for {references.shape[0]} references.")
        if predictions.size == 0:
            raise ValueError("accuracy: no predictions to score.")
        correct = (predictions == references).astype(float)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
