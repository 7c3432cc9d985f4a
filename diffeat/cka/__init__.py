"""CKA (centered kernel alignment) between cached feature sets: exact, out-of-core.

Linear CKA with the unbiased (default) or biased HSIC estimator, RBF CKA, and
minibatch CKA, over pairs or all-pairs matrices of settings. Three exact linear
routes give the same number (feature space, Gram tiles) and stream row blocks
from zarr; the planner picks one from the shapes and a memory budget. The stage's
options are :class:`CkaConfig`; its entry points are in :mod:`diffeat.cka.api`, the
math in :mod:`diffeat.cka.estimators`, the routes in :mod:`diffeat.cka.routes`.
"""

from diffeat.cka.api import cka, cka_matrix, run_cka, store_cka
from diffeat.cka.config import CkaConfig
from diffeat.cka.estimators import (
    ESTIMATORS,
    KERNELS,
    center_gram,
    cka_gram,
    gram_linear,
    gram_rbf,
)
from diffeat.cka.plan import ROUTES
from diffeat.cka.results import CKAResult
from diffeat.cka.settings import SettingSpec
from diffeat.cka.sources import ArraySource, FeatureSetSource

__all__ = [
    "ESTIMATORS",
    "KERNELS",
    "ROUTES",
    "ArraySource",
    "CKAResult",
    "CkaConfig",
    "FeatureSetSource",
    "SettingSpec",
    "center_gram",
    "cka",
    "cka_gram",
    "cka_matrix",
    "gram_linear",
    "gram_rbf",
    "run_cka",
    "store_cka",
]
