"""Figures (matplotlib, Agg backend, no global pyplot state): heatmaps for CKA and accuracy grids."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

Cell = tuple[int, int]


def _marked_cells(matrix: np.ndarray, mark: str | Cell | Sequence[Cell] | None) -> list[Cell]:
    """Cells to outline: ``"max"``/``"min"`` (first best finite cell), one ``(row, col)`` or a list of them."""
    if mark is None:
        return []
    if isinstance(mark, str):
        if mark not in ("max", "min"):
            raise ValueError(f"mark must be 'max', 'min', a (row, col) cell or a list of cells, not {mark!r}")
        if not np.isfinite(matrix).any():
            return []
        filled = np.where(np.isfinite(matrix), matrix, -np.inf if mark == "max" else np.inf)
        flat = int(np.argmax(filled) if mark == "max" else np.argmin(filled))
        return [tuple(int(v) for v in np.unravel_index(flat, matrix.shape))]
    if len(mark) == 2 and all(isinstance(v, (int, np.integer)) for v in mark):
        return [(int(mark[0]), int(mark[1]))]
    return [(int(r), int(c)) for r, c in mark]


def heatmap(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], path: str | Path, *,
            vmin: float | None = None, vmax: float | None = None, title: str = "", cbar_label: str = "",
            mark: str | Cell | Sequence[Cell] | None = None, xlabel: str = "", ylabel: str = "",
            cmap: str = "magma", annotate: bool | None = None, fmt: str = "{:.2f}", dpi: int = 150) -> Path:
    """Draw ``matrix`` (rows × cols) as a heatmap and save it to ``path`` (format from the suffix).

    ``vmin``/``vmax`` fix the color scale (CKA: 0 and 1, so figures are comparable);
    NaN cells are drawn grey (and say "n/a" when annotated). ``mark`` outlines cells: ``"max"``,
    ``"min"``, ``(row, col)`` or a list of cells (e.g. the best accuracy). ``annotate`` writes values
    in the cells (default: when the matrix is at most 16×16). Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"matrix shape {m.shape} does not match {len(row_labels)} row and "
                         f"{len(col_labels)} column labels")
    rows, cols = m.shape
    annotate = (rows <= 16 and cols <= 16) if annotate is None else annotate
    cell = 0.42 if max(rows, cols) <= 16 else 0.26
    width = min(30.0, max(4.5, 2.2 + cell * cols))
    height = min(30.0, max(3.5, 1.6 + cell * rows))
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cm = _colormap(cmap)
    image = ax.imshow(np.ma.masked_invalid(m), cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest",
                      aspect="auto")
    fontsize = 8 if max(rows, cols) <= 16 else 6 if max(rows, cols) <= 40 else 4
    ax.set_xticks(range(cols), [str(v) for v in col_labels], rotation=90, fontsize=fontsize)
    ax.set_yticks(range(rows), [str(v) for v in row_labels], fontsize=fontsize)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:  # wrapped to the figure's width (about 11 characters per inch at 10 pt)
        ax.set_title(textwrap.fill(title, max(30, int(11 * width))), fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    if cbar_label:
        bar.set_label(cbar_label)
    if annotate:
        lo = np.nanmin(m) if vmin is None and np.isfinite(m).any() else (vmin or 0.0)
        hi = np.nanmax(m) if vmax is None and np.isfinite(m).any() else (vmax if vmax is not None else 1.0)
        mid = (lo + hi) / 2
        for r in range(rows):
            for c in range(cols):
                if np.isfinite(m[r, c]):
                    # magma is dark at the low end: light text there, dark text on the bright end.
                    ax.text(c, r, fmt.format(m[r, c]), ha="center", va="center", fontsize=fontsize - 1,
                            color="white" if m[r, c] < mid else "black")
                else:  # undefined (CKA of constant features) or missing: said, not left to the colour
                    ax.text(c, r, "n/a", ha="center", va="center", fontsize=fontsize - 1, color="black")
    for r, c in _marked_cells(m, mark):
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=2))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    logger.info("wrote %s", path)
    return path


def _colormap(name: str):
    """The named colormap with NaN shown in grey (not as the lowest value)."""
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#bbbbbb")
