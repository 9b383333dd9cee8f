"""Mean Corruption Error (Hendrycks & Dietterich, ICLR 2019).

For each corruption c the errors over its severities s are summed and divided
by a baseline model's summed errors on the same (c, s): CE_c = sum_s E_{s,c} /
sum_s E^base_{s,c}. mCE is the mean of CE_c over corruptions. Below 1 means
more robust than the baseline (the paper uses AlexNet; here any reference,
e.g. the source model before adaptation).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "mCE: corruption errors normalised by a baseline's errors per corruption, averaged over corruptions."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): the model's error rate (1 - accuracy, in [0, 1]) on each (corruption, severity).
    references (list of float): the baseline's error rate on the same (corruption, severity), > 0 summed per corruption.
    corruptions (list of str): the corruption name of each entry (entries of one name are its severities).
Returns:
    mce (float) and ce (dict: corruption -> CE_c).
Examples:
    >>> metric = evaluate.load("mpopt_hf/metrics/mce/mce.py")
    >>> metric.compute(predictions=[0.2, 0.3], references=[0.4, 0.3], corruptions=["fog", "snow"])["mce"]
    0.75
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MCE(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Hendrycks, D. and Dietterich, T. Benchmarking Neural Network Robustness to Common Corruptions "
            "and Perturbations. ICLR 2019.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references, corruptions=None):
        errors = np.asarray(predictions, dtype=float)
        baseline = np.asarray(references, dtype=float)
        if corruptions is None or len(corruptions) != len(errors):
            raise ValueError(
                f"mce: give `corruptions`, one name per entry ({len(errors)} errors, "
                f"{0 if corruptions is None else len(corruptions)} names)."
            )
        if len(errors) == 0:
            raise ValueError("mce: no errors to score.")
        if ((errors < 0) | (errors > 1) | (baseline < 0) | (baseline > 1)).any():
            raise ValueError("mce: error rates must lie in [0, 1] (pass 1 - accuracy, not accuracy in percent).")
        ce = {}
        for name in dict.fromkeys(corruptions):  # first-seen order
            rows = np.array([c == name for c in corruptions])
            denominator = baseline[rows].sum()
            if denominator <= 0:
                raise ValueError(f"mce: the baseline makes no error on {name!r}, so its CE is undefined.")
            ce[name] = float(errors[rows].sum() / denominator)
        return {"mce": float(np.mean(list(ce.values()))), "ce": ce}
