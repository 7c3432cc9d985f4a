"""Reading a model's JSON files (``config.json``, ``model_index.json``, scheduler and processor configs)."""

from __future__ import annotations

import json
from pathlib import Path

from diffeat.errors import ModelError


def read_json(path: Path) -> dict:
    """The parsed contents of ``path``; a one-line ``ModelError`` naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from e
