"""The probe stage: heads trained on cached features (see :func:`diffeat.probe.run.probe`).

* ``data``: validation split, streaming standardisation statistics, in-memory / streamed row sources;
* ``train``: the one-pass grid trainer and metrics;
* ``reference``: weighted kNN and scikit-learn logistic regression;
* ``run``: the stage itself (checks, per-setting loop, results and weights).
"""

from diffeat.probe.run import CSV_COLUMNS, HeadResult, ProbeReport, probe

__all__ = ["CSV_COLUMNS", "HeadResult", "ProbeReport", "probe"]
