"""What a feature setting, its catalog entry and a sample table must agree on: one set of checks
for the readers (which refuse what fails) and ``diffeat verify`` (which reports it).

A setting's identity lives in its array's attributes (``attrs.diffeat``): the recorded
``settings`` hash to ``settings_hash``; the folder name carries the first 10 digits of that
hash; ``setting`` (what ``ls``, probe and CKA match on) agrees with ``settings``; the shape
and dtype agree with the block's channels, the pool size and the store dtype. A hand-edited
or damaged attribute breaks one of these, so a reader never takes block 3's array for block 2,
or t=50's for t=90. The catalog entry must say the same as the attributes.
"""

from __future__ import annotations

import re
from typing import Any

from diffeat.store.layout import setting_name, settings_hash

_HASH = re.compile(r"[0-9a-f]{64}")
STATUSES = ("complete", "in_progress")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def setting_problems(path: str, meta: Any, shape: tuple[int, ...], dtype: str) -> list[str]:
    """Everything wrong with the identity of the setting whose ``data`` array is at ``path``.

    ``meta`` is ``attrs["diffeat"]``; ``shape``/``dtype`` are the array's. An empty list means
    the attributes, the folder name, the shape and the dtype all agree.
    """
    if not isinstance(meta, dict):
        return ["no diffeat attributes (attrs.diffeat) on the array"]
    settings, setting, digest = meta.get("settings"), meta.get("setting"), meta.get("settings_hash")
    if not isinstance(settings, dict) or not isinstance(setting, dict):
        return ["no recorded settings (attrs.diffeat.settings and .setting)"]
    problems = []
    if not isinstance(digest, str) or not _HASH.fullmatch(digest):
        problems.append(f"settings_hash {str(digest)[:20]!r} is not a sha256")
        digest = ""
    recomputed = settings_hash(settings)
    if digest and recomputed != digest:
        problems.append(f"settings hash {digest[:12]}... does not match the recorded settings ({recomputed[:12]}...): "
                        "the attributes were edited or damaged")
    if meta.get("status") not in STATUSES:
        problems.append(f"status {meta.get('status')!r} is not one of {', '.join(STATUSES)}")
    parts = path.split("/")
    if len(parts) != 6 or parts[0] != "features" or parts[-1] != "data":
        return [*problems, f"{path} is not features/<model>/<dataset>/<split>/<setting>/data"]
    _, model, dataset, split, folder, _ = parts
    for key, value in (("model", model), ("dataset", dataset), ("split", split)):
        if setting.get(key) != value:
            problems.append(f"setting.{key} is {setting.get(key)!r} but the array is under {value!r}")
    if any(not _int(v) or v < 1 for v in shape[1:]) or len(shape) < 2:
        problems.append(f"shape {tuple(shape)} has no features per row")
    if "import" in settings:
        problems += _import_problems(settings, setting, folder, shape, dtype)
    else:
        problems += _extracted_problems(meta, settings, setting, folder, recomputed, shape, dtype)
    return problems


def _extracted_problems(meta: dict, settings: dict, setting: dict, folder: str, digest: str,
                        shape: tuple[int, ...], dtype: str) -> list[str]:
    problems = []
    block, t, pool = setting.get("block"), setting.get("t"), setting.get("pool")
    # t is None for a model without a timestep (a vision backbone): folder block{b}_pool{k}_<hash10>.
    if not (_int(block) and _int(pool) and (t is None or _int(t))) or setting.get("name") is not None:
        return [f"setting {setting} is neither an extracted setting (block, t, pool) nor an import"]
    for key in ("block", "t", "pool"):
        if settings.get(key) != setting.get(key):
            problems.append(f"setting.{key} is {setting.get(key)} but the recorded settings say {settings.get(key)}")
    model, data = settings.get("model"), settings.get("dataset")
    if not isinstance(model, dict) or model.get("name") != setting.get("model"):
        problems.append(f"setting.model {setting.get('model')!r} is not the recorded model")
    if not isinstance(data, dict) or (data.get("name"), data.get("split")) != (setting.get("dataset"),
                                                                              setting.get("split")):
        problems.append("setting.dataset/split are not the recorded dataset split")
    elif meta.get("manifest_sha256") != data.get("manifest_sha256"):
        problems.append("manifest_sha256 is not the recorded dataset's manifest")
    expected = setting_name(block, t, pool, digest)
    if folder != expected:
        problems.append(f"array folder {folder} is not {expected} (its settings)")
    if settings.get("store_dtype") != dtype:
        problems.append(f"dtype {dtype} is not the recorded store dtype {settings.get('store_dtype')}")
    channels = (meta.get("block_info") or {}).get("channels") if isinstance(meta.get("block_info"), dict) else None
    if channels is not None and tuple(shape[1:]) != (channels, pool, pool):
        problems.append(f"shape {tuple(shape)} does not match block {block}'s {channels} channels at pool {pool}")
    return problems


def _import_problems(settings: dict, setting: dict, folder: str, shape: tuple[int, ...], dtype: str) -> list[str]:
    problems = []
    name = setting.get("name")
    if settings.get("import") != name or folder != name:
        problems.append(f"import name {name!r}, recorded {settings.get('import')!r} and folder {folder!r} differ")
    if settings.get("model") != setting.get("model"):
        problems.append(f"setting.model {setting.get('model')!r} is not the recorded {settings.get('model')!r}")
    data = settings.get("dataset")
    if not isinstance(data, dict) or (data.get("name"), data.get("split")) != (setting.get("dataset"),
                                                                              setting.get("split")):
        problems.append("setting.dataset/split are not the recorded dataset split")
    if settings.get("shape") != list(shape) or settings.get("store_dtype") != dtype:
        problems.append(f"shape {tuple(shape)} {dtype} is not the recorded {settings.get('shape')} "
                        f"{settings.get('store_dtype')}")
    return problems


def entry_problems(entry: dict, expected: dict) -> list[str]:
    """How a setting's catalog entry differs from ``expected``, the entry its array's attributes give.

    ``stored_bytes`` is only compared when both have it; fields an older diffeat did not write
    (``skipped``) may be absent.
    """
    problems = []
    for key in sorted((set(entry) | set(expected)) - {"checksum", "stored_bytes"}):
        if key not in entry:
            if key != "skipped":
                problems.append(f"catalog entry has no {key!r}")
        elif key not in expected:
            problems.append(f"catalog entry has an unknown field {key!r}")
        elif entry[key] != expected[key]:
            problems.append(f"catalog entry says {key} = {_short(entry[key])}, the array {_short(expected[key])}")
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def table_problems(path: str, attrs: Any, ids: list[str], relpaths: list[str], labels: Any,
                   class_names: list[str]) -> list[str]:
    """Everything wrong with the sample table at ``path`` (``datasets/<dataset>/<split>/<manifest12>``).

    The manifest hash is recomputed from the stored rows, so any change to an id, a path, a
    label or a class name shows, whatever the chunk checksums say.
    """
    import numpy as np

    from diffeat.data.table import SampleTable

    if not isinstance(attrs, dict) or not attrs.get("complete"):
        return ["the sample table is incomplete or has no attributes (attrs.diffeat)"]
    parts = path.split("/")
    problems = []
    if len(parts) != 4 or (attrs.get("dataset"), attrs.get("split")) != tuple(parts[1:3]):
        problems.append(f"the table records {attrs.get('dataset')}/{attrs.get('split')} but lies at {path}")
    labels = np.asarray(labels)
    n, k = len(ids), len(class_names)
    if not len(relpaths) == len(labels) == n or attrs.get("n") != n or attrs.get("n_classes") != k:
        problems.append(f"{n} ids, {len(relpaths)} paths, {len(labels)} labels, {k} class names; the attributes say "
                        f"n={attrs.get('n')}, n_classes={attrs.get('n_classes')}")
        return problems
    if n and (labels.min() < 0 or labels.max() >= k):
        return [*problems, f"labels outside 0..{k - 1}"]
    try:
        digest = SampleTable(dataset=str(attrs.get("dataset")), split=str(attrs.get("split")), root=None,
                             ids=tuple(ids), relpaths=tuple(relpaths), labels=labels,
                             class_names=tuple(class_names)).manifest_sha256()
    except Exception as e:  # noqa: BLE001 - a table that cannot even be rebuilt is damaged
        return [*problems, f"the rows do not form a sample table ({type(e).__name__}: {e})"]
    if digest != attrs.get("manifest_sha256"):
        problems.append(f"the rows hash to manifest {digest[:12]}..., the attributes say "
                        f"{str(attrs.get('manifest_sha256'))[:12]}...: ids, paths, labels or class names changed")
    if parts[-1] != digest[:12]:
        problems.append(f"folder {parts[-1]} is not the manifest's first 12 digits {digest[:12]}")
    return problems
