"""Parsing the annotation files of the official layouts: text tables and MATLAB .mat files.

Every problem raises :class:`DatasetError` naming the file (and the line, for
text files), because a user with a broken copy of a dataset needs to know which
file to fetch again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from diffeat.errors import DatasetError


def read_rows(path: Path, fields: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, values)`` for each non-blank line of a whitespace-separated text file.

    ``fields`` names the expected columns (for the error message); the last column
    takes the rest of the line, so it may contain spaces (class names, variants).
    A line with fewer columns raises :class:`DatasetError` naming file and line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DatasetError(f"missing file {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        values = line.split(maxsplit=len(fields) - 1)
        if len(values) != len(fields):
            raise malformed(path, lineno, fields, line)
        values[-1] = values[-1].strip()
        yield lineno, values


def malformed(path: Path, lineno: int, fields: tuple[str, ...], line: str, why: str = "") -> DatasetError:
    """The error for a line that does not match its file's format."""
    expected = " ".join(f"<{f}>" for f in fields)
    return DatasetError(f"{path}:{lineno}: malformed line {line.strip()!r}{': ' + why if why else ''} "
                        f"(expected '{expected}')")


def read_mapping(path: Path, fields: tuple[str, str]) -> dict[str, tuple[int, str]]:
    """Read a two-column ``<key> <value>`` file as ``{key: (line number, value)}``; duplicate keys are errors."""
    out: dict[str, tuple[int, str]] = {}
    for lineno, (key, value) in read_rows(path, fields):
        if key in out:
            raise malformed(path, lineno, fields, f"{key} {value}", f"{fields[0]} {key} already on line {out[key][0]}")
        out[key] = (lineno, value)
    return out


def parse_int(path: Path, lineno: int, fields: tuple[str, ...], line: str, value: str) -> int:
    """``int(value)``, or a malformed-line error naming the file and line."""
    try:
        return int(value)
    except ValueError:
        raise malformed(path, lineno, fields, line, f"{value!r} is not an integer") from None


def load_mat(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Load the variables ``keys`` of a MATLAB file (squeezed: 1×N becomes N, cells become object arrays)."""
    from scipy.io import (
        loadmat,  # scipy is slow to import; only the .mat layouts need it
    )

    if not path.is_file():
        raise DatasetError(f"missing file {path}")
    try:
        mat = loadmat(path, squeeze_me=True)
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError... for broken files
        raise DatasetError(f"cannot read MATLAB file {path}: {e}") from e
    absent = [k for k in keys if k not in mat]
    if absent:
        present = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"{path} has no variable {', '.join(absent)} (it has: {', '.join(present) or 'none'})")
    # squeeze_me turns a 1-element vector into a 0-d array: make every variable 1-d again.
    return {k: np.atleast_1d(mat[k]) for k in keys}


def mat_ints(path: Path, name: str, values: np.ndarray, low: int, high: int | None = None) -> np.ndarray:
    """Check that a .mat variable holds integers in [low, high] and return them as int64."""
    arr = np.asarray(values)
    try:
        as_float = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: variable {name} should hold integers, it holds {arr.dtype}") from None
    bad = (as_float != np.round(as_float)) | (as_float < low)
    if high is not None:
        bad |= as_float > high
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise DatasetError(f"{path}: {name}[{i}] = {arr.reshape(-1)[i]} is not an integer in {bound}")
    return as_float.astype(np.int64).reshape(-1)
