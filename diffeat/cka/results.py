"""What a CKA computation returns: the matrix, its labels, and how it was computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CKAResult:
    """A CKA matrix (rows × columns) and how it was computed."""

    row_labels: list[str]
    col_labels: list[str]
    matrix: np.ndarray  # float64 (rows, cols); NaN where a setting's self-HSIC is not positive
    kernel: str
    estimator: str
    route: str
    n: int
    seconds: float
    plan: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    settings: list[dict] = field(default_factory=list)  # one per distinct setting (rows first)
    config: dict = field(default_factory=dict)  # filled by callers that resolve settings (store, dataset ...)
    files: dict[str, str] = field(default_factory=dict)  # what was written (csv, npy, png, json), when asked
    undefined: dict[str, str] = field(default_factory=dict)  # label -> why CKA with it is undefined (NaN, null)

    @property
    def value(self) -> float:
        """The single CKA value of a 1×1 result (a pair)."""
        if self.matrix.shape != (1, 1):
            raise ValueError(f"value is for a pair; this result is {self.matrix.shape[0]}×{self.matrix.shape[1]}")
        return float(self.matrix[0, 0])

    @property
    def models(self) -> list[str]:
        """The models whose features were compared (from the settings' provenance)."""
        return sorted({str(s["model"]) for s in self.settings if s.get("model")})

    @property
    def models_prefix(self) -> str:
        """``"a vs b: "`` naming the compared models, for titles and console lines ("" when unknown)."""
        return f"{' vs '.join(self.models)}: " if self.models else ""

    @property
    def square(self) -> bool:
        """True when rows and columns are the same settings."""
        return self.row_labels == self.col_labels

    def pair_json(self) -> dict:
        """``{"cka": value, "estimator": ..., "n": ...}`` (plus kernel, route and the two labels)."""
        out = {"cka": _finite(self.value), "estimator": self.estimator, "n": self.n, "kernel": self.kernel,
               "route": self.route, "a": self.row_labels[0], "b": self.col_labels[0]}
        if self.undefined:
            out["undefined"] = self.undefined
        return out

    def matrix_json(self) -> dict:
        """``{"labels": [...], "matrix": [[...]], "estimator": ...}`` (``col_labels`` too when not square)."""
        out: dict[str, Any] = {"labels": self.row_labels}
        if not self.square:
            out["col_labels"] = self.col_labels
        out.update(matrix=[[_finite(v) for v in row] for row in self.matrix], estimator=self.estimator,
                   kernel=self.kernel, route=self.route, n=self.n)
        if self.undefined:
            out["undefined"] = self.undefined
        return out

    def record(self) -> dict:
        """Everything about this result, JSON-friendly (the ``cka.json`` written next to the matrix)."""
        from diffeat import __version__

        return {**self.matrix_json(), "col_labels": self.col_labels, "seconds": round(self.seconds, 3),
                "plan": self.plan, "options": self.options, "settings": self.settings, "config": self.config,
                "diffeat": __version__}


def _finite(v: float) -> float | None:
    """JSON has no NaN: a missing value is null."""
    return float(v) if np.isfinite(v) else None
