"""Datasets read from their official on-disk layouts, as sample tables (nothing is ever downloaded).

``open_dataset(name, root)`` returns a :class:`DatasetLayout`; its
``samples(split)`` is a :class:`SampleTable` (ids, relative paths, 0-based labels,
class names) that extraction turns into features row by row. See docs/datasets.md
for each layout's tree and where to get it.
"""

from diffeat.data.base import DatasetLayout
from diffeat.data.images import preprocess
from diffeat.data.registry import DATASETS, open_dataset
from diffeat.data.table import SampleTable

__all__ = ["DATASETS", "DatasetLayout", "SampleTable", "open_dataset", "preprocess"]
