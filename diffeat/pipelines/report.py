"""The report stage: accuracy heatmaps (block × t), a results table and ``summary.md`` from probe runs.

It reads the ``results.csv`` of the probe stage instances it names, and groups the
test accuracies by (dataset, model, head, pool). Each group becomes one heatmap with
blocks as rows and timesteps as columns, the best cell outlined: ``accuracy.png``
when there is one group, ``accuracy_<dataset>_<model>_<head>_pool<k>.png`` otherwise.
``results.csv`` has one row per (group, block, t) and ``summary.md`` says which
block and t won, next to the figures (and the CKA heatmap of a cka stage, if named).
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffeat.errors import DiffeatError

logger = logging.getLogger(__name__)

#: The accuracies a report can draw (``metric:``).
METRICS = ("top1", "top5", "balanced_acc")


def check_report_options(args: dict, where: str) -> None:
    """The report stage's own checks (it has no options record): its metric and its output folder."""
    from diffeat.runtime.checks import check_choice
    from diffeat.store.location import check_location

    try:
        check_choice(args.get("metric", "top1"), METRICS, "metric")
        check_location(args.get("out"), "out")
    except DiffeatError as e:
        raise DiffeatError(f"stage {where}: {e}") from None


@dataclass(frozen=True)
class Cell:
    """One probed setting's numbers (accuracies as fractions)."""

    block: int
    t: int | None  # None: a model without a timestep (a vision backbone)
    test: float
    test_top5: float
    val: float
    hparams: str


def collect_cells(results_csvs: list[str], metric: str = "top1") -> dict[tuple, list[Cell]]:
    """Test/validation ``metric`` of the selected hyperparameters, grouped by (dataset, model, head, pool)."""
    from diffeat.output.records import read_results

    rows = read_results([Path(p) for p in results_csvs])
    test: dict[tuple, dict[str, str]] = {}
    val: dict[tuple, float] = {}
    for r in rows:
        if not r.get("block") or r.get("selected") != "True":
            continue  # imported feature sets have no block/t: nothing to place in a block × t map
        t = int(r["t"]) if r["t"] else None  # none: a model without a timestep (a vision backbone)
        key = (r["dataset"], r["model"], r["head"], int(r["pool"]), int(r["block"]), t)
        if r["split"] == "test" and r["metric"] in (metric, "top5"):
            test.setdefault(key, {"hparams": r["hparams"]})[r["metric"]] = r["value"]
        elif r["split"] == "val" and r["metric"] == metric:
            val[key] = float(r["value"]) if r["value"] else float("nan")
    if not test:
        raise DiffeatError(f"report: no test {metric} results with a block and t in {', '.join(results_csvs)}")
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for key, v in sorted(test.items()):
        groups[key[:4]].append(Cell(key[4], key[5], float(v.get(metric, "nan") or "nan"),
                                    float(v.get("top5", "nan") or "nan"), val.get(key, float("nan")), v["hparams"]))
    return dict(groups)


def grid_of(cells: list[Cell]) -> tuple[list[int], list[int], np.ndarray]:
    """Blocks (rows), timesteps (columns) and the test accuracy matrix (NaN where not probed)."""
    blocks = sorted({c.block for c in cells})
    ts = sorted({c.t for c in cells})
    m = np.full((len(blocks), len(ts)), np.nan)
    for c in cells:
        m[blocks.index(c.block), ts.index(c.t)] = c.test
    return blocks, ts, m


def best_cells(cells: list[Cell]) -> tuple[Cell, Cell]:
    """The best cell on test (as in the paper's ablation figures) and the one validation would choose."""
    by_test = max(cells, key=lambda c: (np.nan_to_num(c.test, nan=-1), np.nan_to_num(c.val, nan=-1)))
    by_val = max(cells, key=lambda c: (np.nan_to_num(c.val, nan=-1), np.nan_to_num(c.test, nan=-1)))
    return by_test, by_val


def _block_names(records: list[dict], group: tuple, blocks: list[int]) -> dict[int, str]:
    """``{block: "mid_block, 64×2×2"}`` from the store the probe read (best effort: empty if unreadable)."""
    from diffeat.store import open_store

    dataset, model, _, pool = group
    out: dict[int, str] = {}
    for rec in records:
        store = rec.get("arguments", {}).get("store")
        try:
            fs = open_store(store, mode="r", storage_options=rec["arguments"].get("storage_options"))
            for info in fs.list_settings():
                if info.dataset == dataset and info.model == model and info.block in blocks and info.pool == pool:
                    bi = fs.open_features(dataset=dataset, split=info.split, block=info.block, t=info.t,
                                          pool=pool, model=model).attrs.get("block_info", {})
                    if bi:
                        out[info.block] = f"`{bi['module']}`, {bi['channels']}×{bi['height']}×{bi['width']}"
        except (DiffeatError, KeyError, TypeError):
            continue
    return out


def write_report(*, records: list[dict], out: str | Path, cka_records: list[dict] | None = None,
                 metric: str = "top1", title: str | None = None) -> dict:
    """Write heatmaps, ``results.csv`` and ``summary.md`` into ``out`` from probe stage ``records``.

    ``metric``: top1 (default), top5 or balanced_acc. Returns the stage outputs:
    ``{"files": {name: path}, "best": [one dict per group: block, t, test, ...]}``.
    """
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    groups = collect_cells([r["outputs"]["results_csv"] for r in records], metric)
    files: dict[str, str] = {}
    lines = [f"# {title or 'diffeat report'}", ""]
    best_rows, singles = [], []
    for group, cells in groups.items():
        by_test, by_val = best_cells(cells)
        best_rows.append({"dataset": group[0], "model": group[1], "head": group[2], "pool": group[3],
                          "block": by_test.block, "t": by_test.t, "test": by_test.test, "val_block": by_val.block,
                          "val_t": by_val.t, "val_choice_test": by_val.test})
        if len(cells) == 1:  # one setting is a number, not a map: it goes in the table of single settings
            singles.append((group, cells[0]))
            continue
        stem = "accuracy" if len(groups) == 1 else "accuracy_{}_{}_{}_pool{}".format(*group)
        lines += _group_section(group, cells, by_test, by_val, records, out / f"{stem}.png", metric)
        files[stem] = str(out / f"{stem}.png")
    if singles:
        lines += [f"## {'Other settings' if files else 'Settings'}", "",
                  f"Test {metric} (%) with the hyperparameters chosen on validation:", "",
                  "| dataset | model | head | pool | block | t | test | validation |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {g[0]} | {g[1]} | {g[2]} | {g[3]} | {c.block} | {'–' if c.t is None else c.t} | "
                  f"{100 * c.test:.2f} | {100 * c.val:.2f} |"
                  for g, c in singles]
        lines.append("")
    files["results"] = str(_write_results(out / "results.csv", groups, metric))
    for rec in cka_records or []:
        lines += ["## CKA between settings", "", f"![CKA]({os.path.relpath(rec['outputs']['files']['png'], out)})", "",
                  (f"Linear CKA on {rec['outputs'].get('n')} images; the matrix is in "
                   f"`{os.path.relpath(rec['outputs']['files']['csv'], out)}`."), ""]
    lines += ["## Files", "", f"- `results.csv`: one row per setting, {metric} as fractions",
              *[f"- probe run `{os.path.relpath(r['outputs']['run_dir'], out)}`: long-format results, run.json"
                for r in records], ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    files["summary"] = str(summary)
    logger.info("report: wrote %s", ", ".join(Path(p).name for p in files.values()))
    return {"files": files, "best": best_rows}


def _group_section(group: tuple, cells: list[Cell], by_test: Cell, by_val: Cell, records: list[dict], png: Path,
                   metric: str) -> list[str]:
    """The heatmap of one (dataset, model, head, pool) group and its summary.md section."""
    from diffeat.output.plots import heatmap

    dataset, model, head, pool = group
    blocks, ts, m = grid_of(cells)
    heatmap(100 * m, [str(b) for b in blocks], ["–" if t is None else str(t) for t in ts], png,
            title=f"{head} probe, test {metric} (%): {model} on {dataset}, pool {pool}",
            cbar_label=f"test {metric} (%)", xlabel="timestep t" if ts != [None] else "(no timestep)",
            ylabel="block", cmap="viridis", fmt="{:.1f}",
            mark=(blocks.index(by_test.block), ts.index(by_test.t)))
    names = _block_names(records, group, [by_test.block])
    what = f" ({names[by_test.block]})" if by_test.block in names else ""
    lines = [f"## {model} on {dataset}: {head} head, pool {pool}", "",
             (f"**Best: block {by_test.block}{what}{_at(by_test.t)}: {100 * by_test.test:.1f}% test {metric}** "
              f"(the highest test accuracy of the {len(blocks)} blocks × {len(ts)} timesteps probed, as the "
              "paper's ablation figures report it)."), ""]
    if (by_val.block, by_val.t) != (by_test.block, by_test.t):
        lines += [(f"Choosing on the validation split instead picks block {by_val.block}{_at(by_val.t)} "
                   f"({100 * by_val.val:.1f}% validation, {100 * by_val.test:.1f}% test)."), ""]
    else:
        lines += ["Choosing on the validation split picks the same setting.", ""]
    return lines + [f"![accuracy]({png.name})", "", _markdown_table(blocks, ts, m, metric), ""]


def _at(t: int | None) -> str:
    """``", t = 90"``, or nothing for a setting without a timestep."""
    return "" if t is None else f", t = {t}"


def _write_results(path: Path, groups: dict[tuple, list[Cell]], metric: str) -> Path:
    """``results.csv``: one row per (group, block, t), accuracies as fractions."""
    # With metric top5 the two test columns are one: dict.fromkeys keeps the first of equal names.
    columns = list(dict.fromkeys(["dataset", "model", "head", "pool", "block", "t", f"test_{metric}", "test_top5",
                                  f"val_{metric}", "hparams"]))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for (dataset, model, head, pool), cells in groups.items():
            writer.writerows({"dataset": dataset, "model": model, "head": head, "pool": pool, "block": c.block,
                              "t": c.t, "test_top5": c.test_top5, f"test_{metric}": c.test, f"val_{metric}": c.val,
                              "hparams": c.hparams} for c in cells)
    return path


def _markdown_table(blocks: list[int], ts: list[int], m: np.ndarray, metric: str) -> str:
    """The matrix as a markdown table (percent, one decimal; the best cell in bold)."""
    best = np.nanmax(m) if np.isfinite(m).any() else np.nan
    head = "| block \\ t | " + " | ".join("–" if t is None else str(t) for t in ts) + " |"
    rule = "|---" * (len(ts) + 1) + "|"
    body = []
    for b, row in zip(blocks, m):
        cells = ["" if not np.isfinite(v) else (f"**{100 * v:.1f}**" if v == best else f"{100 * v:.1f}") for v in row]
        body.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join([f"Test {metric} (%):", "", head, rule, *body])
