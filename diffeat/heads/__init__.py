"""Probe heads and their registry.

``HEADS`` maps a head name to its :class:`HeadSpec`: the ``nn.Module`` class for
heads trained by the grid trainer (linear, mlp, cnn, attention) and the
metadata of the reference evaluators run by ``diffeat.probe.reference``
(knn, logistic). A new head is one module in this package plus one registry line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from diffeat.errors import DiffeatError
from diffeat.heads.attention import AttentionHead
from diffeat.heads.cnn import MIN_POOL as CNN_MIN_POOL
from diffeat.heads.cnn import CNNHead
from diffeat.heads.common import Probe, Standardize
from diffeat.heads.linear import LinearHead
from diffeat.heads.mlp import MLPHead
from diffeat.runtime.checks import check_choice


@dataclass(frozen=True)
class HeadSpec:
    """What the probe needs to know about a head before building it.

    Attributes:
        name: registry key (``--head NAME``).
        summary: one line for ``--help`` and docs.
        kind: ``"trained"`` (an ``nn.Module`` trained by the grid trainer) or
            ``"reference"`` (an evaluator in ``diffeat.probe.reference``).
        cls: the module class (trained heads), built as ``cls(feature_shape, num_classes, **options)``.
        needs_map: needs ``(C, k, k)`` maps; flat ``(D,)`` features are refused.
        min_pool: smallest pooled size ``k`` it accepts.
        optimizer: ``"sgd"`` (momentum 0.9, L2 weight decay) or ``"adamw"`` (decoupled decay).
        lrs / wds: the default grid (learning rates × weight decays) trained in one pass.
        convex: the training problem is convex (linear on fixed features): the probe then
            treats the learning rate as an optimisation setting, not a regulariser.
        etas: when set (and no ``--lr`` is given), the learning rates are ``η / E‖x‖²`` for
            these η, with ``E‖x‖²`` the mean squared norm of the (standardised) input, i.e.
            about D: normalised-LMS step sizes. The largest stable SGD step of a linear
            model shrinks as the input norm grows, so fixed rates that suit D = 32 blow up
            at D = 4096 and crawl at D = 32 what suits D = 4096; the best measured
            η was 10–40 from D = 32 (digits) to D = 4096 (probe benchmark).
        cs: when set (and no ``--wd`` is given), the weight decays are ``1 / (C · n_fit)``
            for these C: scikit-learn's inverse regularisation strengths, so the grid
            follows the dataset size (the best L2 strength falls as 1/n) and matches the
            logistic-regression search point for point.
    """

    name: str
    summary: str
    kind: str = "trained"
    cls: type[nn.Module] | None = None
    needs_map: bool = False
    min_pool: int = 1
    optimizer: str = "sgd"
    lrs: tuple[float, ...] = ()
    wds: tuple[float, ...] = ()
    convex: bool = False
    etas: tuple[float, ...] = ()
    cs: tuple[float, ...] = ()
    options: dict = field(default_factory=dict)
    sizing: Callable[[tuple[int, ...]], dict] | None = None

    def defaults(self, feature_shape: tuple[int, ...]) -> dict:
        """The head's options for features of ``feature_shape``: the registry's, sized to the features.

        The paper's widths (MLP 2048, CNN 256, attention 1024) suit ADM's 1024-channel blocks; on a
        48-channel block they are 5–40× more compute than the features can use (measured on the
        digits demo data: the CNN head took 610 s, the MLP 67 s). ``sizing`` scales them down with
        the feature size, never above the paper's.
        """
        return {**self.options, **(self.sizing(tuple(feature_shape)) if self.sizing else {})}


def _mlp_width(shape: tuple[int, ...]) -> dict:
    """Hidden width 2·D, between 256 and the paper's 2048."""
    return {"hidden": (min(2048, max(256, 2 * math.prod(shape))),)}


def _cnn_width(shape: tuple[int, ...]) -> dict:
    """Conv width C (the block's channels), between 64 and the paper's 256."""
    return {"width": min(256, max(64, shape[0]))}


def _attention_width(shape: tuple[int, ...]) -> dict:
    """Token width 2·C rounded up to a multiple of 64 (so 8 heads divide it), between 128 and the paper's 1024."""
    return {"dim": min(1024, max(128, 64 * math.ceil(2 * shape[0] / 64)))}


# Default grids: factor ~3 in lr is enough (neighbours near the optimum differ by < 1 point,
# probe_cka.md §4.2); a weight-decay axis recovers the points a wd=0 grid loses to tuned-C
# logistic regression on few-shot-sized datasets. With SGD, wd = 1 / (C · n_train).
HEADS: dict[str, HeadSpec] = {
    "linear": HeadSpec("linear", "Linear(C·k², classes) on standardised features (L-BFGS over C, or the SGD grid "
                       "with --recipe paper)", cls=LinearHead,
                       etas=(5.0, 20.0, 80.0), cs=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0), convex=True,
                       options={"batchnorm": False}),
    "mlp": HeadSpec("mlp", "MLP on flattened features, ReLU, hidden widths --mlp-hidden (SGD grid)", cls=MLPHead,
                    lrs=(0.003, 0.01, 0.03), wds=(0.0, 1e-3, 1e-2), options={"hidden": (2048,)}, sizing=_mlp_width),
    "cnn": HeadSpec("cnn", "conv3×3-BN-ReLU stack, global pool, linear on C×k×k maps; needs k >= 2 (SGD grid)",
                    cls=CNNHead, needs_map=True, min_pool=CNN_MIN_POOL, lrs=(0.003, 0.01, 0.03), wds=(1e-4, 1e-3),
                    options={"width": 256, "depth": 2}, sizing=_cnn_width),
    "attention": HeadSpec("attention", "LayerNorm + 1×1 proj, CLS token, transformer blocks (AdamW grid)",
                          cls=AttentionHead, needs_map=True, optimizer="adamw", lrs=(1e-4, 3e-4, 1e-3),
                          wds=(0.05,), options={"dim": 1024, "depth": 2, "heads": 8}, sizing=_attention_width),
    "knn": HeadSpec("knn", "weighted cosine kNN (k=20, T=0.07) on standardised features; no training",
                    kind="reference", options={"k": 20, "temperature": 0.07}),
    "logistic": HeadSpec("logistic", "scikit-learn L-BFGS logistic regression, C chosen on validation, refit",
                         kind="reference", options={"cs": (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)}),
}


def get_head(name: str) -> HeadSpec:
    """The registry entry for ``name``, or a ``DiffeatError`` listing the valid names."""
    return HEADS[check_choice(name, HEADS, "--head")]


def check_head(name: str, feature_shape: tuple[int, ...]) -> HeadSpec:
    """Raise a ``DiffeatError`` unless head ``name`` can take one sample of ``feature_shape``.

    ``feature_shape`` is ``(C, k, k)`` for extracted features or ``(D,)`` for imported ones.
    """
    spec = get_head(name)
    if spec.needs_map and len(feature_shape) != 3:
        raise DiffeatError(f"head {name!r} needs C×k×k feature maps; these features have shape "
                           f"{tuple(feature_shape)} (use linear, mlp, knn or logistic)")
    if len(feature_shape) == 3 and min(feature_shape[1:]) < spec.min_pool:
        raise DiffeatError(f"head {name!r} needs pool size k >= {spec.min_pool}; this setting has k = "
                           f"{feature_shape[1]} (extract with --pool {spec.min_pool} or larger, or use another head)")
    return spec


def build_head(name: str, feature_shape: tuple[int, ...], num_classes: int, **options) -> nn.Module:
    """Build trained head ``name`` for ``feature_shape`` inputs and ``num_classes`` outputs.

    ``options`` override the defaults sized to the features (``HeadSpec.defaults``: ``hidden``
    for mlp, ``width``/``depth`` for cnn, ``dim``/``depth``/``heads`` for attention,
    ``batchnorm`` for linear).
    """
    spec = check_head(name, feature_shape)
    if spec.kind != "trained" or spec.cls is None:
        raise DiffeatError(f"head {name!r} is a reference evaluator, not an nn.Module")
    unknown = set(options) - set(spec.options)
    if unknown:
        raise DiffeatError(f"head {name!r} has no option(s) {sorted(unknown)}; it takes {sorted(spec.options)}")
    return spec.cls(tuple(feature_shape), num_classes, **{**spec.defaults(feature_shape), **options})


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(math.prod(p.shape) for p in module.parameters() if p.requires_grad)


__all__ = ["HEADS", "AttentionHead", "CNNHead", "HeadSpec", "LinearHead", "MLPHead", "Probe", "Standardize",
           "build_head", "check_head", "count_parameters", "get_head"]
