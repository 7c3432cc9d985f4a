"""Saving and loading trained probes as safetensors (weights + JSON metadata, no pickle)."""

from __future__ import annotations

import json
from pathlib import Path

from diffeat.errors import DiffeatError
from diffeat.heads import build_head
from diffeat.heads.common import Probe, Standardize

FORMAT = 1


def save_probe(path: str | Path, probe: Probe, *, head: str, feature_shape: tuple[int, ...],
               class_names: list[str], meta: dict | None = None) -> Path:
    """Write ``probe`` (standardiser + head) to ``path`` with what is needed to rebuild it.

    The metadata (``diffeat_probe``, JSON) holds the head name and its options, the
    feature shape, class names and any caller ``meta`` (setting, hyperparameters).
    """
    from safetensors.torch import save_file

    config = getattr(probe.head, "config", {})
    doc = {"format": FORMAT, "head": head, "options": config, "feature_shape": list(feature_shape),
           "class_names": list(class_names), **(meta or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    save_file(tensors, str(path), metadata={"diffeat_probe": json.dumps(doc, sort_keys=True)})
    return Path(path)


def load_probe(path: str | Path) -> tuple[Probe, dict]:
    """Rebuild a probe saved by :func:`save_probe`: ``(probe in eval mode, metadata)``.

    The probe takes raw stored features ``(B, *feature_shape)`` and returns logits.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("diffeat_probe")
    if raw is None:
        raise DiffeatError(f"{path} is not a diffeat probe (no diffeat_probe metadata)")
    doc = json.loads(raw)
    tensors = load_file(str(path))
    standardize = Standardize(tensors["standardize.mean"], tensors["standardize.inv_std"])
    head = build_head(doc["head"], tuple(doc["feature_shape"]), len(doc["class_names"]), **doc["options"])
    probe = Probe(standardize, head)
    probe.load_state_dict(tensors)
    return probe.eval(), doc
