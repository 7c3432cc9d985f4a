"""The linear probe by full-batch L-BFGS: multinomial logistic regression in torch, on the device.

What the strong linear-probe protocols do (CLIP's and DINOv2's ``log_regression``,
probe_cka.md §4.2), made fast enough to be the default:

* the objective is scikit-learn's ``LogisticRegression``: mean cross-entropy of ``x W + b``
  plus ``λ/2 ‖W‖²`` with ``λ = 1 / (C · n)`` and the bias unpenalised; features are
  standardised once with float64 statistics (``diffeat.probe.data.moments``);
* a **regularisation path** over C, from the strongest penalty up, each fit warm-started from
  the previous solution, **with its L-BFGS curvature pairs carried over** (the penalty's
  Hessian is ``λ I``, so a pair ``(s, y)`` of the previous C becomes exactly ``(s, y + Δλ s)``);
  C is chosen on the validation split (top-1, ties to the lower cross-entropy), the path stops
  once two grid points in a row are worse than the best, and the two half-decade neighbours of
  the best are tried;
* a **refit** on train + validation at the chosen C (λ follows the larger n, as scikit-learn's
  refit keeps C), warm-started, to a ten times tighter tolerance (scikit-learn's refit tolerance).

In memory, the logits ``Z = X W + b`` of the current point are kept, the direction's
``X P`` is computed once, and the strong-Wolfe line search runs on ``Z + α X P`` without
touching X again: whatever the line search does, an iteration is exactly two matrix products
(``X P`` and ``Xᵀ G``), against two per trial step for a generic optimiser. A split streamed from the store (larger than the
memory budget) is read in row blocks through its :class:`~diffeat.probe.data.RowSource`;
each evaluation is then one pass that computes the loss and the full gradient together
(``Σ_blocks x_bᵀ G_b``), which L-BFGS's unit step makes about one pass per iteration.

The convergence test is scikit-learn's: the largest gradient component at most ``tol``.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import solve_triangular

from diffeat.heads import LinearHead, Probe, Standardize
from diffeat.probe.data import RowSource
from diffeat.probe.train import TOPK

logger = logging.getLogger(__name__)

#: scikit-learn's default tolerance (``gtol``: largest gradient component of the mean objective).
TOL = 1e-4
#: The refit's tolerance, as a fraction of ``tol``: 1e-5, scikit-learn's refit tolerance. Refits to
#: 1e-6 or 1e-7 reach the optimum itself, which on the probe benchmarks was one test image away from
#: the 1e-5 model (once higher, once lower), for 60 % more refit iterations (16 against 10).
REFIT_TOL = 0.1
#: Where float32 stops: a fit whose line search finds no decrease with the largest gradient component
#: below this is at the optimum as far as float32 logits and products can tell (measured: 1e-6–3e-6
#: on weakly regularised problems, where scikit-learn in float64 goes on to 1e-10).
FLOAT32_GRAD = 1e-5
#: L-BFGS history (pairs); scikit-learn's scipy L-BFGS-B keeps 10 as well.
HISTORY = 10
#: Grid points in a row worse than the best on validation before the path stops.
PATIENCE = 2
#: Accepted steps between two recomputations of the logits from X (in memory).
REFRESH = 50
#: Largest logits (n × K float32) kept per C of the path, so that fits started from that C's
#: solution (the half-decade neighbours) begin without a pass over the data.
SNAPSHOT_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------
# Parameters: W (D, K) and b (K,) as one flat float32 vector


@dataclass
class Params:
    """A point ``θ = (W, b)`` stored flat: ``W = θ[:D·K].view(D, K)``, ``b = θ[D·K:]``."""

    flat: torch.Tensor
    d: int
    k: int

    @classmethod
    def zeros(cls, d: int, k: int, device: torch.device) -> Params:
        """The zero point."""
        return cls(torch.zeros(d * k + k, device=device), d, k)

    @property
    def w(self) -> torch.Tensor:
        """``(D, K)`` weights (a view)."""
        return self.flat[: self.d * self.k].view(self.d, self.k)

    @property
    def b(self) -> torch.Tensor:
        """``(K,)`` bias (a view)."""
        return self.flat[self.d * self.k:]

    def like(self, flat: torch.Tensor) -> Params:
        """Another vector of the same shape, as Params."""
        return Params(flat, self.d, self.k)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b))


# ---------------------------------------------------------------------------------------------
# The data side: designs (standardised rows) that evaluate the objective


class Design(ABC):
    """Standardised rows ``X`` (n, D) with labels: evaluates the objective and runs line searches."""

    n: int
    d: int
    #: relative noise of the objective's value (the line search's Armijo test allows for it)
    f_noise: float = 1e-13

    @abstractmethod
    def start(self, theta: Params, lam: float) -> tuple[float, torch.Tensor]:
        """Objective and flat gradient at ``theta`` (the design remembers the point)."""

    @abstractmethod
    def line(self, theta: Params, p: Params, lam: float) -> Callable[[float], tuple[float, float]]:
        """``phi(α) -> (f(θ + αp), f'(θ + αp)·p)`` for the line search from ``theta`` along ``p``."""

    @abstractmethod
    def accept(self, alpha: float) -> torch.Tensor:
        """Move to ``θ + αp`` (the caller updates θ); return the flat gradient there."""

    def snapshot(self) -> tuple | None:
        """What :meth:`restore` needs to come back to the current point without a pass (None: nothing kept)."""
        return None

    def restore(self, snap: tuple | None) -> None:
        """Go back to a :meth:`snapshot` (the caller restores θ to its point); a design that kept none re-reads."""


def _lse_in_place(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logsumexp(z, 1), Σ_k exp(z - max))`` in float64, leaving ``exp(z - max)`` in ``z``.

    One ``exp`` pass and no (n, K) temporaries: on the probe benchmark the (n, K) element-wise
    work is a third of an iteration's time next to its two matrix products.
    """
    m = z.amax(1, keepdim=True)
    e = torch.exp(z.sub_(m), out=z)
    total = e.sum(1, dtype=torch.float64)
    return m.squeeze(1).double() + total.log(), total


def _gradient_rows(e: torch.Tensor, total: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """``G = (softmax - onehot(y)) / n`` in place in ``e = exp(z - max)`` (``total`` its row sums)."""
    e.div_((total * n).to(e.dtype)[:, None])
    e[torch.arange(len(y), device=e.device), y] -= 1.0 / n
    return e


class DenseDesign(Design):
    """Rows held on the device as one float32 tensor; the logits of the current point kept.

    The data part of the gradient at the current point is kept too, so a path's next C starts
    without a pass: only the penalty term ``λ W`` changes. The logits are updated along each
    accepted step (``Z += α X P``) and recomputed from X every :data:`REFRESH` steps, so float32
    rounding does not accumulate. Per row, the cross-entropy and the slope are computed in
    float32 and summed in float64.
    """

    f_noise = 1e-7  # float32 logits: the objective's value is good to about 1e-8 (relative)

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x = x
        self.y = y
        self.n, self.d = x.shape
        self.z: torch.Tensor | None = None  # logits at self.point
        self.point: torch.Tensor | None = None
        self.loss = 0.0  # mean cross-entropy at self.point
        self.grad_data: torch.Tensor | None = None  # flat gradient of the mean cross-entropy at self.point
        self.steps = 0

    def _product(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.addmm(b, self.x, w)

    def _settle(self, point: torch.Tensor) -> None:
        """Loss and data gradient at ``point`` from ``self.z`` (one ``Xᵀ G`` product)."""
        e = self.z.clone()
        lse, total = _lse_in_place(e)
        self.loss = float((lse - self.z.gather(1, self.y[:, None])[:, 0].double()).mean())
        g_rows = _gradient_rows(e, total, self.y, self.n)
        self.grad_data = torch.cat([torch.mm(self.x.T, g_rows).reshape(-1), g_rows.sum(0)])
        self.point = point

    def _at(self, theta: Params, lam: float) -> tuple[float, torch.Tensor]:
        g = self.grad_data.clone()
        g[: theta.d * theta.k].add_(theta.flat[: theta.d * theta.k], alpha=lam)
        return self.loss + lam / 2 * _sq(theta.w), g

    def start(self, theta: Params, lam: float) -> tuple[float, torch.Tensor]:
        if self.point is None or not torch.equal(self.point, theta.flat):
            if bool(theta.w.any()):
                self.z = self._product(theta.w, theta.b)
            else:  # the path's zero start: every row's logits are the bias
                self.z = theta.b.expand(self.n, theta.k).clone()
            self._settle(theta.flat.clone())
        return self._at(theta, lam)

    def line(self, theta: Params, p: Params, lam: float) -> Callable[[float], tuple[float, float]]:
        xp = self._product(p.w, p.b)
        # ‖W‖² exactly as the objective at α = 0 computed it (_at), so f(0) is f0 to the bit
        ww, wp, pp = _sq(theta.w), _dot(theta.w.reshape(-1), p.w.reshape(-1)), _dot(p.w.reshape(-1), p.w.reshape(-1))
        xp_y = float(xp.gather(1, self.y[:, None]).sum(dtype=torch.float64)) / self.n
        z_y = float(self.z.gather(1, self.y[:, None]).sum(dtype=torch.float64)) / self.n
        z = self.z
        self._pending = (xp, theta, p, lam)

        def phi(alpha: float) -> tuple[float, float]:
            e = torch.add(z, xp, alpha=alpha)
            lse, total = _lse_in_place(e)
            # Σ_k p_k (XP)_k per row, as Σ_k e_k (XP)_k / Σ_k e_k
            moved = torch.einsum("ij,ij->i", e, xp).double() / total
            f = float(lse.mean()) - z_y - alpha * xp_y
            slope = float(moved.mean()) - xp_y
            return f + lam / 2 * (ww + 2 * alpha * wp + alpha * alpha * pp), slope + lam * (wp + alpha * pp)

        return phi

    def accept(self, alpha: float) -> torch.Tensor:
        xp, theta, p, lam = self._pending
        self._pending = None
        new = theta.like(torch.add(theta.flat, p.flat, alpha=alpha))  # what the caller's update gives
        self.steps += 1
        if self.steps % REFRESH:
            self.z.add_(xp, alpha=alpha)
        else:
            self.z = self._product(new.w, new.b)
        self._settle(new.flat)
        return self._at(new, lam)[1]

    def snapshot(self) -> tuple | None:
        """The current point's logits and gradient, to come back to without a pass (None: too large)."""
        if self.z is None or self.z.numel() * 4 > SNAPSHOT_BYTES:
            return None
        return self.point.clone(), self.z.clone(), self.loss, self.grad_data.clone()

    def restore(self, snap: tuple | None) -> None:
        """Go back to a :meth:`snapshot` (the caller restores θ to its point)."""
        if snap is not None:
            point, z, self.loss, grad = snap
            self.point, self.z, self.grad_data = point.clone(), z.clone(), grad.clone()


def _sq(t: torch.Tensor) -> float:
    """``‖t‖²`` accumulated in float64."""
    v = t.reshape(-1).double()
    return float(torch.dot(v, v))


class StreamedDesign(Design):
    """Rows read block by block from a :class:`RowSource` at every evaluation (one pass each).

    ``extra`` rows (the validation rows) ride along in the same pass: their logits at the
    last evaluated point are kept, so choosing C costs no pass of its own.
    """

    f_noise = 1e-7  # float32 logits summed in float64: the objective's value is good to about 1e-8

    def __init__(self, source: RowSource, rows: np.ndarray, standardize: Standardize, labels: np.ndarray,
                 device: torch.device, extra: np.ndarray | None = None):
        self.source = source
        self.rows = rows
        self.extra = np.zeros(0, np.int64) if extra is None else extra
        # The flat (D,) statistics on the device, once: every pass standardises its blocks with them.
        self.mean, self.inv = (t.to(device) for t in _flat_stats(standardize, source.feature_shape))
        self.device = device
        self.labels = labels  # (N,) class index of every row of the source, remapped
        self.n = len(rows)
        self.d = math.prod(source.feature_shape)
        self.extra_logits: torch.Tensor | None = None
        self.point: torch.Tensor | None = None  # where the last pass evaluated
        self.loss = 0.0  # mean cross-entropy there
        self.grad_data: torch.Tensor | None = None  # and its gradient
        self.passes = 0

    def _blocks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for r, x in self.source.blocks(rows):
            t = torch.from_numpy(x.reshape(len(r), self.d)).to(self.device, non_blocking=True)
            # In place: a block is this pass's until it asks for the next (a fresh array, or a buffer
            # of the streamed source's ring), and a second block-sized tensor per block is what
            # pushed a streamed fit past its memory budget.
            yield r, t.sub_(self.mean).mul_(self.inv)

    def evaluate(self, theta: Params) -> None:
        """One pass at ``theta``: mean cross-entropy, its gradient, and the extra rows' logits."""
        self.passes += 1
        gw = torch.zeros_like(theta.w)
        gb = torch.zeros_like(theta.b)
        loss = 0.0
        extra_out = torch.empty(len(self.extra), theta.k, device=self.device) if len(self.extra) else None
        union = np.union1d(self.rows, self.extra) if len(self.extra) else self.rows
        for r, x in self._blocks(union):
            z = torch.addmm(theta.b, x, theta.w)
            fit = None  # rows of the block in the fitted set (None: all of them)
            if extra_out is not None:
                in_extra = np.isin(r, self.extra, assume_unique=True)
                if in_extra.any():
                    pos = np.searchsorted(self.extra, r[in_extra])
                    extra_out[torch.from_numpy(pos).to(self.device)] = z[torch.from_numpy(in_extra).to(self.device)]
                    fit = torch.from_numpy(~in_extra).to(self.device)
            y = torch.from_numpy(self.labels[r]).to(self.device)
            z_y = z.gather(1, y[:, None])[:, 0].double()
            lse, total = _lse_in_place(z)  # z now holds exp(z - max)
            g_rows = _gradient_rows(z, total, y, self.n)
            if fit is not None:
                # The extra rows stay in the product with zero weight: no copy of the block without them.
                loss += float((lse - z_y)[fit].sum())
                g_rows.mul_(fit[:, None])
            else:
                loss += float((lse - z_y).sum())
            gw.addmm_(x.T, g_rows)
            gb += g_rows.sum(0)
        self.loss = loss / self.n
        self.grad_data = torch.cat([gw.reshape(-1), gb])
        self.extra_logits = extra_out
        self.point = theta.flat.clone()

    def _at(self, theta: Params, lam: float) -> tuple[float, torch.Tensor]:
        if self.point is None or not torch.equal(self.point, theta.flat):
            self.evaluate(theta)
        g = self.grad_data.clone()
        g[: theta.d * theta.k].add_(theta.flat[: theta.d * theta.k], alpha=lam)
        return self.loss + lam / 2 * _sq(theta.w), g

    def start(self, theta: Params, lam: float) -> tuple[float, torch.Tensor]:
        return self._at(theta, lam)  # no pass when the previous fit ended here (a path's next C)

    def line(self, theta: Params, p: Params, lam: float) -> Callable[[float], tuple[float, float]]:
        self._base, self._p, self._lam = theta, p, lam

        def phi(alpha: float) -> tuple[float, float]:
            f, g = self._at(theta.like(torch.add(theta.flat, p.flat, alpha=alpha)), lam)
            return f, _dot(g, p.flat)

        return phi

    def accept(self, alpha: float) -> torch.Tensor:
        return self._at(self._base.like(torch.add(self._base.flat, self._p.flat, alpha=alpha)), self._lam)[1]

    def extra_at(self, theta: Params) -> torch.Tensor:
        """The extra rows' logits at ``theta`` (from the last pass when it was there)."""
        if self.point is None or not torch.equal(self.point, theta.flat):
            self.evaluate(theta)
        return self.extra_logits


# ---------------------------------------------------------------------------------------------
# L-BFGS with a strong-Wolfe line search


class History:
    """L-BFGS curvature pairs ``(s, y)`` in the compact representation (Byrd, Nocedal & Schnabel 1994).

    The pairs are rows of one ``(2m, P)`` buffer (``s`` in the first m, ``y`` in the last m),
    and their inner products ``sᵢ·yⱼ`` and ``yᵢ·yⱼ`` are kept as small float64 matrices. A
    direction then costs two matrix-vector products with the buffer, against 4m vector
    operations for the two-loop recursion (each a pass over P values and, on a loaded CPU, a
    thread hand-off: 40 of them took 0.3 s per direction on the probe benchmark).
    """

    def __init__(self, size: int, lam: float = 0.0):
        self.size = size
        self.lam = lam
        self.buf: torch.Tensor | None = None
        self.order: list[int] = []  # buffer slots, oldest first
        self.sy = np.zeros((size, size))  # sy[i, j] = s_i·y_j (slots)
        self.yy = np.zeros((size, size))

    def __len__(self) -> int:
        return len(self.order)

    def clear(self) -> None:
        """Forget every pair."""
        self.order.clear()
        if self.buf is not None:
            self.buf.zero_()

    def push(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """Add a pair (replacing the oldest when full) if it has positive curvature."""
        ys, yy = _dot(y, s), _dot(y, y)
        if not ys > 1e-10 * yy:
            return
        if self.buf is None:
            self.buf = torch.zeros(2 * self.size, len(s), device=s.device, dtype=s.dtype)
        slot = self.order.pop(0) if len(self.order) == self.size else \
            next(i for i in range(self.size) if i not in self.order)
        self.order.append(slot)
        self.buf[slot].copy_(s)
        self.buf[self.size + slot].copy_(y)
        # [s_i·s, s_i·y; y_i·s, y_i·y] in one pass over the buffer
        with_s, with_y = torch.mm(self.buf, torch.stack([s, y], 1)).double().cpu().numpy().T
        self.sy[slot, :] = with_s[self.size:]
        self.sy[:, slot] = with_y[:self.size]
        self.yy[slot, :] = self.yy[:, slot] = with_y[self.size:]
        self.sy[slot, slot], self.yy[slot, slot] = ys, yy

    def retarget(self, lam: float, n_weights: int) -> None:
        """Carry the pairs to penalty ``lam``: the penalty's Hessian is ``λ I`` on the weights,
        so each ``y`` gains ``Δλ s`` there; pairs whose curvature turns non-positive are dropped."""
        delta = lam - self.lam
        self.lam = lam
        if delta == 0.0 or not self.order:
            return
        m = self.size
        self.buf[m:, :n_weights].add_(self.buf[:m, :n_weights], alpha=delta)
        s_rows, y_rows = self.buf[:m], self.buf[m:]
        self.sy = torch.mm(s_rows, y_rows.T).double().cpu().numpy()
        self.yy = torch.mm(y_rows, y_rows.T).double().cpu().numpy()
        bad = [i for i in self.order if not self.sy[i, i] > 1e-10 * self.yy[i, i]]
        for i in bad:
            self.order.remove(i)
            self.buf[i].zero_()
            self.buf[m + i].zero_()

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """``-H g`` (``-g`` without pairs)."""
        if not self.order:
            return -g
        m, idx = self.size, self.order
        sg_yg = torch.mv(self.buf, g).double().cpu().numpy()
        a, c = sg_yg[:m][idx], sg_yg[m:][idx]
        sy = self.sy[np.ix_(idx, idx)]
        r = np.triu(sy)  # R_ij = s_i·y_j for i <= j (chronological)
        last = idx[-1]
        gamma = self.sy[last, last] / self.yy[last, last]
        r_inv_a = solve_triangular(r, a, lower=False)
        top = solve_triangular(r, (np.diag(np.diag(sy)) + gamma * self.yy[np.ix_(idx, idx)]) @ r_inv_a - gamma * c,
                               lower=False, trans="T")
        coef = np.zeros(2 * m)
        coef[np.array(idx)] = top
        coef[m + np.array(idx)] = -gamma * r_inv_a
        # H g = γ g + S top + γ Y (-R⁻¹ a)
        hg = torch.addmv(g, self.buf.T, torch.from_numpy(coef).to(g.device, g.dtype), beta=gamma)
        return hg.neg_()


def _cubic_min(a: float, fa: float, da: float, b: float, fb: float, db: float) -> float:
    """Minimiser of the cubic through ``(a, fa, da)`` and ``(b, fb, db)``, kept inside the interval."""
    lo, hi = min(a, b), max(a, b)
    d1 = da + db - 3 * (fa - fb) / (a - b)
    disc = d1 * d1 - da * db
    if disc >= 0:
        d2 = math.copysign(math.sqrt(disc), b - a)
        t = b - (b - a) * (db + d2 - d1) / (db - da + 2 * d2)
        if lo + 0.1 * (hi - lo) <= t <= hi - 0.1 * (hi - lo):
            return t
    return (lo + hi) / 2


def wolfe_search(phi: Callable[[float], tuple[float, float]], f0: float, d0: float, alpha: float, *,
                 c1: float = 1e-4, c2: float = 0.9, f_tol: float = 0.0, max_trials: int = 25
                 ) -> tuple[float, float] | None:
    """A step ``(α, f(α))`` meeting the strong Wolfe conditions (Nocedal & Wright, Alg. 3.5–3.6), or None.

    ``f_tol`` is the noise allowed in the sufficient-decrease test.
    """
    a_prev, f_prev, d_prev = 0.0, f0, d0
    trials = 0

    def armijo(a: float, f: float) -> bool:
        return f <= f0 + c1 * a * d0 + f_tol

    def zoom(lo: float, f_lo: float, d_lo: float, hi: float, f_hi: float, d_hi: float):
        nonlocal trials
        while trials < max_trials:
            a = _cubic_min(lo, f_lo, d_lo, hi, f_hi, d_hi)
            f, d = phi(a)
            trials += 1
            if not armijo(a, f) or f >= f_lo:
                hi, f_hi, d_hi = a, f, d
            else:
                if abs(d) <= -c2 * d0:
                    return a, f
                if d * (hi - lo) >= 0:
                    hi, f_hi, d_hi = lo, f_lo, d_lo
                lo, f_lo, d_lo = a, f, d
            if abs(hi - lo) < 1e-12 * max(1.0, abs(lo)):
                break
        return (lo, f_lo) if lo > 0 and f_lo < f0 else None

    a = alpha
    while trials < max_trials:
        f, d = phi(a)
        trials += 1
        if not math.isfinite(f) or not armijo(a, f) or (trials > 1 and f >= f_prev):
            if not math.isfinite(f):
                f, d = math.inf, math.inf
            return zoom(a_prev, f_prev, d_prev, a, f, d)
        if abs(d) <= -c2 * d0:
            return a, f
        if d >= 0:
            return zoom(a, f, d, a_prev, f_prev, d_prev)
        a_prev, f_prev, d_prev = a, f, d
        a *= 4.0
    return None


@dataclass
class FitInfo:
    """How one L-BFGS fit ended."""

    n_iter: int
    converged: bool
    objective: float
    grad_max: float
    seconds: float


def minimize(design: Design, theta: Params, lam: float, *, tol: float = TOL, max_iter: int = 1000,
             history: History | None = None) -> FitInfo:
    """Minimise the objective over ``theta`` (updated in place) by L-BFGS; stop at ``max|∇f| ≤ tol``.

    ``history`` carries curvature pairs in and out (a warm-started path reuses them).
    """
    start = time.perf_counter()
    history = history if history is not None else History(HISTORY, lam)
    history.retarget(lam, theta.d * theta.k)
    f, g = design.start(theta, lam)
    n_iter, converged = 0, False
    gmax = float(g.abs().max())
    while n_iter < max_iter:
        if gmax <= tol:
            converged = True
            break
        p_flat = history.direction(g)
        slope = _dot(g, p_flat)
        if not slope < 0:  # not a descent direction: forget the pairs
            history.clear()
            p_flat = -g
            slope = _dot(g, p_flat)
        # Without pairs, a steepest-descent step: the penalty's Hessian λ I bounds the curvature
        # from below, so 1/λ bounds the exact step from above (and 1/‖g‖ keeps it modest).
        first = 1.0 if len(history) else min(1.0 / max(1e-12, float(g.norm())), 1.0 / max(lam, 1e-12))
        p = theta.like(p_flat)
        found = wolfe_search(design.line(theta, p, lam), f, slope, first, f_tol=design.f_noise * abs(f))
        if found is None:  # no decrease within the objective's precision: as converged as float32 gets
            converged = gmax <= max(tol, FLOAT32_GRAD)
            break
        alpha, f = found
        g_new = design.accept(alpha)
        theta.flat.add_(p_flat, alpha=alpha)  # as the line search computed the point
        s = p_flat.mul_(alpha)
        history.push(s, g_new - g)
        g = g_new
        gmax = float(g.abs().max())
        n_iter += 1
    return FitInfo(n_iter, converged, f, gmax, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# The probe: path over C, selection on validation, refit


def _flat_stats(standardize: Standardize, feature_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, inv_std)`` of a :class:`Standardize` broadcast to every feature, flattened."""
    return (standardize.mean.expand(feature_shape).reshape(-1).float(),
            standardize.inv_std.expand(feature_shape).reshape(-1).float())


def _dense(source: RowSource, groups: Sequence[np.ndarray], standardize: Standardize,
           device: torch.device) -> torch.Tensor:
    """The standardised rows of ``groups`` (sorted row-index arrays), one group after the other,
    as one float32 (n, D) tensor on ``device``, read in one pass over the source."""
    d = math.prod(source.feature_shape)
    total = sum(len(g) for g in groups)
    dest = np.full(len(source), -1, np.int64)
    pos = 0
    for g in groups:
        dest[g] = np.arange(pos, pos + len(g))
        pos += len(g)
    mean, inv = (t.to(device) for t in _flat_stats(standardize, source.feature_shape))
    out = torch.empty(total, d, device=device)
    for r, x in source.blocks(np.sort(np.concatenate(groups))):
        block = torch.from_numpy(x.reshape(len(r), d)).to(device)
        out[torch.from_numpy(dest[r]).to(device)] = block.sub_(mean).mul_(inv)
    return out


def _restandardize(x: torch.Tensor, old: Standardize, new: Standardize, feature_shape: tuple[int, ...]) -> bool:
    """Turn rows standardised with ``old`` into rows standardised with ``new``, in place.

    ``(x·s_old⁻¹ + m_old - m_new)·s_new⁻¹`` per feature: one pass instead of reading the split
    again. False (nothing changed) when a feature constant under ``old`` varies under ``new``.
    """
    m_old, i_old = (t.to(x.device) for t in _flat_stats(old, feature_shape))
    m_new, i_new = (t.to(x.device) for t in _flat_stats(new, feature_shape))
    if bool(((i_old == 0) & (i_new != 0)).any()):
        return False
    scale = torch.where(i_old != 0, i_new / torch.where(i_old != 0, i_old, 1.0), 0.0)
    x.mul_(scale).add_((m_old - m_new) * i_new)
    return True


def dense_bytes(n: int, d: int, k: int) -> int:
    """Memory a split of ``n`` rows needs to be fitted in memory: X (float32) and the float64 logits."""
    return n * d * 4 + 3 * n * k * 8


def _topk(logits: torch.Tensor, classes: np.ndarray) -> np.ndarray:
    k = min(TOPK, logits.shape[1])
    return classes[logits.topk(k, dim=1).indices.cpu().numpy()]


def _loss(logits: torch.Tensor, y: torch.Tensor) -> float:
    z = logits.double()
    return float((torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0]).mean())


def fit(train: RowSource, fit_rows: np.ndarray, val_rows: np.ndarray, std_fit: Standardize,
        std_all: Standardize, *, cs: Sequence[float], num_classes: int, device: torch.device,
        budget: int, refit: bool = True, tol: float = TOL, patience: int = PATIENCE,
        max_iter: int = 1000) -> dict:
    """Choose C on validation along a warm-started path, refit, and return the model as a linear :class:`Probe`.

    ``cs``: the grid (searched in increasing order from the smallest). ``budget``: bytes the
    standardised split may take in memory (else it is streamed through ``train``). Returns
    the dict of :func:`diffeat.probe.reference.logistic`: ``grid`` (per C tried: hparams,
    val_topk, val_loss, converged, n_iter), ``chosen``, ``probe``, ``converged``, ``n_train``,
    ``seconds``; plus ``passes`` (reads of the split when streamed) and ``in_memory``.
    """
    start = time.perf_counter()
    d = math.prod(train.feature_shape)
    classes = np.unique(train.labels[np.union1d(fit_rows, val_rows)])
    remap = np.full(max(num_classes, int(classes.max()) + 1), -1, np.int64)
    remap[classes] = np.arange(len(classes))
    labels = remap[train.labels]
    k = len(classes)
    in_memory = dense_bytes(len(fit_rows) + len(val_rows), d, k) <= budget
    y_val_np = train.labels[val_rows]
    y_val = torch.from_numpy(labels[val_rows]).to(device)
    n_fit = len(fit_rows)
    x_all = x_val = None
    if in_memory:
        x_all = _dense(train, [fit_rows, val_rows], std_fit, device)
        design: Design = DenseDesign(x_all[:n_fit], torch.from_numpy(labels[fit_rows]).to(device))
        x_val = x_all[n_fit:]
    else:
        design = StreamedDesign(train, fit_rows, std_fit, labels, device, extra=val_rows)
    n_fit = len(fit_rows)

    grid: list[dict] = []
    solutions: dict[float, torch.Tensor] = {}
    snapshots: dict[float, tuple | None] = {}
    history = History(HISTORY)
    theta = Params.zeros(d, k, device)

    def try_c(c: float) -> dict:
        info = minimize(design, theta, 1.0 / (c * n_fit), tol=tol, max_iter=max_iter, history=history)
        if x_val is not None:
            logits = torch.addmm(theta.b, x_val, theta.w)
        else:
            logits = design.extra_at(theta)
        entry = {"hparams": {"C": float(c)}, "val_topk": _topk(logits, classes), "val_loss": _loss(logits, y_val),
                 "converged": info.converged, "n_iter": info.n_iter, "objective": info.objective,
                 "seconds": info.seconds}
        grid.append(entry)
        solutions[float(c)] = theta.flat.clone()
        snapshots[float(c)] = design.snapshot()
        logger.info("lbfgs C=%.3g: val top-1 %.4f, %d iterations, max|grad| %.2e, %.2f s", c,
                    float((entry["val_topk"][:, 0] == y_val_np).mean()), info.n_iter, info.grad_max, info.seconds)
        return entry

    def score(e: dict) -> tuple[float, float]:
        return float((e["val_topk"][:, 0] == y_val_np).mean()), -e["val_loss"]

    best_i = 0
    for i, c in enumerate(sorted(cs)):
        e = try_c(c)
        if score(e) > score(grid[best_i]):
            best_i = i
        if i - best_i >= patience:
            logger.info("lbfgs: validation got worse %d times in a row after C=%.3g: path stopped", patience,
                        grid[best_i]["hparams"]["C"])
            break
    c0 = grid[best_i]["hparams"]["C"]
    for c in (c0 / math.sqrt(10.0), c0 * math.sqrt(10.0)):
        if all(not math.isclose(c, e["hparams"]["C"]) for e in grid):
            nearest = min(solutions, key=lambda v: abs(math.log(v / c)))
            theta.flat.copy_(solutions[nearest])
            design.restore(snapshots[nearest])
            history.clear()  # they describe the path's last point, not this start
            try_c(c)
    best = max(sorted(grid, key=lambda e: e["hparams"]["C"]), key=score)
    c_best = best["hparams"]["C"]
    theta.flat.copy_(solutions[c_best])
    passes = getattr(design, "passes", 0)

    if refit:
        rows_all = np.union1d(fit_rows, val_rows)
        del design
        if in_memory:
            if not _restandardize(x_all, std_fit, std_all, train.feature_shape):
                x_all = _dense(train, [fit_rows, val_rows], std_all, device)
            design = DenseDesign(x_all, torch.from_numpy(labels[np.concatenate([fit_rows, val_rows])]).to(device))
        else:
            design = StreamedDesign(train, rows_all, std_all, labels, device)
        info = minimize(design, theta, 1.0 / (c_best * len(rows_all)), tol=tol * REFIT_TOL, max_iter=max_iter,
                        history=History(HISTORY))
        passes += getattr(design, "passes", 0)
        std_final, n_train, converged = std_all, len(rows_all), info.converged
        logger.info("lbfgs refit at C=%.3g on %d rows: %d iterations, %.2f s", c_best, n_train, info.n_iter,
                    info.seconds)
    else:
        std_final, n_train, converged = std_fit, n_fit, best["converged"]
    probe = as_probe(theta, classes, std_final, train.feature_shape, num_classes)
    return {"grid": grid, "chosen": best, "probe": probe, "converged": converged, "n_train": n_train,
            "seconds": time.perf_counter() - start, "passes": passes, "in_memory": in_memory}


def as_probe(theta: Params, classes: np.ndarray, standardize: Standardize, feature_shape: tuple[int, ...],
             num_classes: int) -> Probe:
    """The fitted model as ``Probe(standardize, LinearHead)`` over all ``num_classes`` (absent classes never win)."""
    head = LinearHead(feature_shape, num_classes)
    w = torch.zeros(num_classes, theta.d)
    b = torch.full((num_classes,), -1e4)
    idx = torch.from_numpy(classes.astype(np.int64))
    w[idx] = theta.w.T.float().cpu()
    b[idx] = theta.b.float().cpu()
    with torch.no_grad():
        head.fc.weight.copy_(w)
        head.fc.bias.copy_(b)
    return Probe(Standardize(standardize.mean, standardize.inv_std), head).eval()
