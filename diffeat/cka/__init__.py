"""CKA (centered kernel alignment) between cached feature sets: exact, out-of-core.

Linear CKA with the unbiased (default) or biased HSIC estimator, RBF CKA, and
minibatch CKA, over pairs or all-pairs matrices of settings. Three exact linear
routes give the same number (feature space, Gram tiles) and stream row blocks
from zarr; the planner picks one from the shapes and a memory budget. The math
is in :mod:`diffeat.cka.estimators`, the routes in :mod:`diffeat.cka.routes`.
"""

from diffeat.cka.api import CKAResult, cka, cka_matrix
from diffeat.cka.estimators import ESTIMATORS, KERNELS, center_gram, cka_gram, gram_linear, gram_rbf
from diffeat.cka.plan import ROUTES, memory_budget, parse_bytes
from diffeat.cka.sources import ArraySource, FeatureSetSource

__all__ = [
    "ESTIMATORS",
    "KERNELS",
    "ROUTES",
    "ArraySource",
    "CKAResult",
    "FeatureSetSource",
    "center_gram",
    "cka",
    "cka_gram",
    "cka_matrix",
    "gram_linear",
    "gram_rbf",
    "memory_budget",
    "parse_bytes",
]
