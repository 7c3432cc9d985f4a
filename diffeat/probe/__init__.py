"""The probe stage: heads trained on cached features (see :func:`diffeat.probe.run.run_probe`).

* ``config``: ``ProbeConfig``, every option of the stage in one record;
* ``data``: validation split, standardisation, in-memory / streamed row sources;
* ``grid`` and ``train``: the one-pass grid trainer, selection and metrics;
* ``reference``: weighted kNN and scikit-learn logistic regression;
* ``cluster``: the statistics pass of streamed splits on a dask cluster;
* ``run``: the stage itself (checks, per-setting loop, results and weights).
"""

from diffeat.probe.config import ProbeConfig
from diffeat.probe.run import CSV_COLUMNS, HeadResult, ProbeReport, probe, run_probe

__all__ = ["CSV_COLUMNS", "HeadResult", "ProbeConfig", "ProbeReport", "probe", "run_probe"]
