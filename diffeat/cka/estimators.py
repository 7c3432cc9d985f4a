"""The CKA formulas on in-memory matrices: what every route reduces to.

Notation: ``n`` samples, features ``X`` (n, D) centered column-wise, linear Gram
``K = X Xᵀ``, ``s = diag(K)`` (row squared norms of the centered features) and
``S = Σ s = ‖X‖²_F``.

* **biased** HSIC (Kornblith et al. 2019): ``tr(K H L H) / (n-1)²``. With centered
  features ``H K H = K``, so it is ``⟨K, L⟩ / (n-1)² = ‖XᵀY‖²_F / (n-1)²``.
* **unbiased** HSIC (Song et al. 2007), computed as the Frobenius product of
  U-centered Grams (Székely & Rizzo) divided by ``n(n-3)``. U-centering removes any
  additive row/column effect exactly, so the value does not depend on centering the
  features first; centering is done anyway because it keeps the products small.
  For centered features the row sums of ``K`` vanish, so with ``K̃ = K - diag(s)``:
  ``K̃ 1 = -s`` and ``1ᵀ K̃ 1 = -S``, and the U-centered Gram is
  ``Ũ_ij = K_ij + (s_i + s_j)/(n-2) - S/((n-1)(n-2))`` off the diagonal, 0 on it.
  Song's three terms then give the feature-space form (no n×n matrix)::

      n(n-3)·HSIC_u = ‖XᵀY‖²_F - n/(n-2)·sᵀr + S_x S_y/((n-1)(n-2))

  (``r``, ``S_y``: the same quantities for ``Y``; derivation in docs/cka.md).

CKA = HSIC(K, L) / √(HSIC(K, K)·HSIC(L, L)). Everything here is float64.
"""

from __future__ import annotations

import numpy as np

from diffeat.errors import DiffeatError
from diffeat.runtime.checks import check_choice

ESTIMATORS = ("unbiased", "biased")
KERNELS = ("linear", "rbf")


def check_estimator(estimator: str, n: int) -> None:
    """Raise a ``DiffeatError`` for an unknown estimator or too few samples for it."""
    check_choice(estimator, ESTIMATORS, "--estimator")
    minimum = 4 if estimator == "unbiased" else 2
    if n < minimum:
        raise DiffeatError(f"the {estimator} HSIC estimator needs at least {minimum} samples, got {n}")


def hsic_scale(n: int, estimator: str) -> float:
    """The factor turning a Frobenius product of centered Grams into HSIC."""
    return 1.0 / ((n - 1) ** 2) if estimator == "biased" else 1.0 / (n * (n - 3))


def center_features(x: np.ndarray) -> np.ndarray:
    """Column-centered float64 copy of ``x`` (n, D)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return x - x.mean(axis=0, keepdims=True)


def gram_linear(x: np.ndarray) -> np.ndarray:
    """Linear Gram ``X Xᵀ`` of the column-centered features (float64)."""
    xc = center_features(x)
    return xc @ xc.T


def sq_distances(x: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances (n, n), float64, clipped at 0 against rounding."""
    xc = center_features(x)  # distances do not change; the products get smaller
    sq = np.einsum("ij,ij->i", xc, xc)
    d = xc @ xc.T
    d *= -2.0
    d += sq[:, None]
    d += sq[None, :]
    np.maximum(d, 0.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def gram_rbf(x: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """RBF Gram with the median-distance bandwidth (Kornblith et al.'s ``gram_rbf``).

    ``K_ij = exp(-d²_ij / (2 θ² · median(d²)))`` where the median runs over all n²
    entries (diagonal included) and θ is ``threshold`` (a fraction of the median distance).
    """
    if not threshold > 0:
        raise DiffeatError(f"--rbf-threshold must be > 0, got {threshold}")
    d = sq_distances(x)
    median = float(np.median(d))
    if median <= 0:
        raise DiffeatError("RBF CKA: the median pairwise distance is 0 (more than half the rows are identical)")
    d *= -1.0 / (2.0 * threshold**2 * median)
    return np.exp(d, out=d)


def center_gram(k: np.ndarray, estimator: str, *, inplace: bool = False) -> np.ndarray:
    """Center a symmetric Gram for ``estimator``: double centering (biased) or U-centering (unbiased)."""
    k = np.asarray(k, dtype=np.float64)
    if not inplace:
        k = k.copy()
    n = k.shape[0]
    if estimator == "biased":
        means = k.mean(axis=0)
        k -= means[:, None]
        k -= means[None, :]
        k += means.mean()
        return k
    np.fill_diagonal(k, 0.0)
    sums = k.sum(axis=0)
    total = sums.sum()
    k -= sums[:, None] / (n - 2)
    k -= sums[None, :] / (n - 2)
    k += total / ((n - 1) * (n - 2))
    np.fill_diagonal(k, 0.0)
    return k


def u_center_tile(g: np.ndarray, s_rows: np.ndarray, s_cols: np.ndarray, total: float, n: int,
                  diagonal: bool) -> np.ndarray:
    """U-center, in place, the tile ``Xc[r] Xc[c]ᵀ`` of the linear Gram of centered features.

    ``s_rows``/``s_cols`` are the squared norms of the tile's rows/columns, ``total`` the sum of
    all n of them; ``diagonal`` says the tile straddles the Gram's diagonal (r == c), whose
    entries are zeroed. See the module docstring for the formula.
    """
    g += s_rows[:, None] / (n - 2)
    g += s_cols[None, :] / (n - 2)
    g -= total / ((n - 1) * (n - 2))
    if diagonal:
        np.fill_diagonal(g, 0.0)
    return g


def hsic_from_centered_grams(k: np.ndarray, l: np.ndarray, estimator: str) -> float:
    """HSIC from two Grams already centered with :func:`center_gram` for ``estimator``."""
    # A float64 sum of products: float32 norms/dots over 1e8 entries lose 1e-4..1e-2 (probe_cka.md §3.3).
    return float(np.einsum("ij,ij->", k, l)) * hsic_scale(k.shape[0], estimator)


def feature_hsic(cross_sq: np.ndarray | float, s_dot: np.ndarray | float, total_x: np.ndarray | float,
                 total_y: np.ndarray | float, n: int, estimator: str) -> np.ndarray | float:
    """HSIC from feature-space statistics of centered features (works elementwise on arrays).

    ``cross_sq = ‖XᵀY‖²_F``, ``s_dot = sᵀr`` (row squared norms of X and Y), ``total_x = S_x``,
    ``total_y = S_y``.
    """
    if estimator == "biased":
        return cross_sq / ((n - 1) ** 2)
    return (cross_sq - n / (n - 2) * s_dot + total_x * total_y / ((n - 1) * (n - 2))) / (n * (n - 3))


def cka_from_hsic(h: np.ndarray) -> np.ndarray:
    """CKA matrix from a symmetric HSIC matrix: ``h_ij / √(h_ii h_jj)``.

    A setting whose self-HSIC is not positive (constant features, or a negative unbiased
    estimate on degenerate data) gets NaN in its row and column rather than a number
    that looks meaningful.
    """
    d = np.diag(h).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), np.nan)
        return h * scale[:, None] * scale[None, :]


def cka_gram(k: np.ndarray, l: np.ndarray, estimator: str = "unbiased") -> float:
    """CKA between two (uncentered) Gram matrices: the in-memory definition."""
    check_estimator(estimator, k.shape[0])
    kc, lc = center_gram(k, estimator), center_gram(l, estimator)
    h = np.array([[hsic_from_centered_grams(kc, kc, estimator), hsic_from_centered_grams(kc, lc, estimator)],
                  [0.0, hsic_from_centered_grams(lc, lc, estimator)]])
    h[1, 0] = h[0, 1]
    return float(cka_from_hsic(h)[0, 1])
