"""The diffeat feature store (Zarr v3): layout, writer and readers.

Format specification: ``docs/store-format.md``. Readers open a store with
``open_store(location)`` (read-only by default), or ``as_store(store)`` for a
location or an already open store, and a setting with
``FeatureStore.open_features(...)``, which returns a :class:`FeatureSet`
(features as a zarr or dask array, sample ids, labels, class names).
"""

from diffeat.store.layout import ChunkPlan, check_name, plan_chunks, settings_hash
from diffeat.store.reader import (
    FeatureSet,
    FeatureStore,
    SettingInfo,
    as_store,
    open_features,
    open_store,
)

__all__ = [
    "ChunkPlan",
    "FeatureSet",
    "FeatureStore",
    "SettingInfo",
    "as_store",
    "check_name",
    "open_features",
    "open_store",
    "plan_chunks",
    "settings_hash",
]
