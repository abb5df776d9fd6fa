"""Entropic optimal transport between two point clouds: blockwise log-domain Sinkhorn in torch.

One job, one module (about 700 lines): the solver, the block cost it walks (`BlockCost`, whose cached
blocks the solver overwrites in place with kernels and which must then serve the cost again) and
the readers of the plan (`summarize_plan`, `plan_values`, which recompute plan entries from the
same blocks and potentials) share that block and kernel state; split apart, each would have to
know the others' invariants.

The problem (paper Eq. 9) between n control cells and m target cells with uniform marginals
a = 1/n, b = 1/m:

    P* = argmin_{P 1 = a, P^T 1 = b}  <P, C> - eps H(P),     H(P) = -sum_ij P_ij log P_ij

Its solution has the form (Eq. 10) P_ij = exp((f_i + g_j - C_ij) / eps) with dual potentials f
(n,) and g (m,), which Sinkhorn's algorithm finds by alternating the two exact marginal fits

    g_j = eps log b_j - eps LSE_i((f_i - C_ij) / eps)
    f_i = eps log a_i - eps LSE_j((g_j - C_ij) / eps)

in the log domain (LSE = log-sum-exp), so no kernel exp(-C / eps) ever under- or overflows.

The cost (`BlockCost`) is never needed as a whole: the solver walks over column blocks of C
(all controls x a slice of targets), each either cached (while the memory budget allows) or
recomputed from the coordinates on the fly. One pass over the blocks does a whole iteration:
for each block it fits g on that block's targets, then adds the block's contribution to the
log-sum-exp that fits f, so memory is O((n + m) d + block) and never n x m unless it fits.
Once the g steps have settled, that contribution is one matrix-vector product with the
stabilised exponentials the g fit just computed (`_row_update_from_columns`) instead of a
second log-sum-exp pass.

Cached blocks then hold that kernel instead of the cost (`_sweep_kernel_block`): after the
first settled pass each cached block is overwritten in place by the stabilised kernel
K_ji = exp(alpha0_i - C_ij / eps - peak_j) of the potentials alpha0 of that pass, and later
passes fit g by one matrix-vector product K exp(alpha - alpha0) and f by one with K^T, with no
exp over the n x m entries and no recomputation of the cost (Schmitzer's absorption, 2019).
Kernel entries are clamped at e^-80 (not e^-60) of their column's largest, and the kernels are
re-absorbed (recomputed from the cost) once alpha - alpha0 spreads over more than
`KERNEL_SPREAD` (20), so the clamp still weighs under e^-60 of every sum. `BlockCost.blocks()`
always serves the cost, recomputing it where a kernel was held. On CPU a cached block is swept
in chunks of `KERNEL_CHUNK_BYTES` so that the second product reads the chunk from cache, not
from memory.

Convergence is tested on the marginals: after an exact f update every row of P sums to 1/n
exactly, and the solver stops when the L1 violation of the column marginal,
sum_j |sum_i P_ij - 1/m|, falls below `tol` (the total mass is 1, so `tol` is a fraction of
it). That test costs nothing extra: the column sums of the current plan are exactly the
log-sum-exps the next g update computes.

Over-relaxation (Thibault et al. 2017; Lehmann et al. 2021): the updates can be extrapolated,
f <- (1 - w) f + w f_new with 1 < w < 2, which has the same fixed point and needs several
times fewer iterations at small eps. `omega="auto"` starts plain (w = 1), estimates the
linear rate r of plain Sinkhorn, sets w = 2 / (1 + sqrt(1 - r)) (the SOR optimum, capped at
`OMEGA_MAX`), and is safeguarded: every `check_every`-th f update is exact so the marginal
test stays valid, and whenever the error grows the solver returns to the best iterate so far
and halves w - 1. `omega=1` is the textbook algorithm.

Every tensor lives on `BlockCost(device=...)` ("cpu" by default; "cuda" runs the same code on
a GPU). This module is about 700 lines because the cost, the solver and the plan summary share
the block layout and its cache states; splitting them would spread one invariant over files.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

OMEGA_MAX = 1.8  # cap of the automatic over-relaxation factor
EXP_FLOOR = 60.0  # exp arguments are clamped at -EXP_FLOOR (see _lse_)
FAST_SPREAD = 10.0  # largest g-step spread at which rows are updated by a mat-vec product
REPORT_EVERY_S = 30.0  # a solve running longer logs its progress this often
SINGLE_THREAD_MAX_ENTRIES = 1 << 22  # below this many cost entries one torch thread is faster
_MB = 1 << 20
KERNEL_FLOOR = 80.0  # cached kernel entries are clamped at exp(-KERNEL_FLOOR) of their column's largest
KERNEL_SPREAD = 20.0  # cached kernels are re-absorbed once max - min of alpha - alpha0 exceeds this
KERNEL_CACHE = True  # cached blocks hold the stabilised kernel once Sinkhorn settles (tests switch it off)
KERNEL_CHUNK_BYTES = 8 * _MB  # CPU: a cached kernel block is swept in chunks this size


@contextmanager
def torch_threads_for(n_entries: int) -> Iterator[None]:
    """Run small problems on one torch thread (restored afterwards), large ones on all.

    A pass over a small cost matrix is a few dozen tiny kernels, where the thread pool's
    synchronisation costs more than it saves (measured: 2.3 ms vs 15 ms per iteration at
    243 x 177 on a busy 2-core machine).
    """
    before = torch.get_num_threads()
    if n_entries < SINGLE_THREAD_MAX_ENTRIES and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class SinkhornWarning(UserWarning):
    """Sinkhorn stopped at `max_iter` before the marginal error reached `tol`."""


def rms_distance(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Root mean square of ||x_i - y_j|| over all n x m pairs, exactly, in O((n + m) d).

    E_ij ||x_i - y_j||^2 = mean_i ||x_i||^2 + mean_j ||y_j||^2 - 2 mean(x) . mean(y); computed
    after centring both clouds on the mean of x, in float64. x: (n, d), y: (m, d).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    shift = x.mean(axis=0)
    xc, yc = x - shift, y - shift
    value = (xc * xc).sum(1).mean() + (yc * yc).sum(1).mean() - 2.0 * float(xc.mean(0) @ yc.mean(0))
    return math.sqrt(max(value, 0.0))


class BlockCost:
    """The n x m cost matrix of one transport problem, served in blocks of target columns.

    C_ij = ||x_i - y_j||_2 / expr_scale                                  (expression, Eq. 8)
         + spatial_weight * ||p_i - q_j||_2 / spatial_scale_um            (optional spatial term)
    and C_ij = +inf where ||p_i - q_j||_2 > max_distance_um               (optional hard radius)

    x: (n, d) control coordinates, y: (m, d) target coordinates (any float array; e.g. PCA).
    x_pos: (n, 2), y_pos: (m, 2) positions in um (needed for the spatial term or the radius).
    expr_scale: divisor of the expression distance; None = the root mean square distance over
      all control-target pairs (`rms_distance`), so the cost is dimensionless and eps means
      the same thing on any data (eps = 0.05 is 5% of a typical pair distance).
    dtype: torch.float32 (default) or torch.float64; all arithmetic runs in it.
    memory_mb: budget for cached cost blocks plus the solver's working buffers. Blocks that do
      not fit are recomputed from the coordinates at every pass.
    block_mb: size of one block (all n controls x a slice of targets).
    device: where the coordinates, blocks and solver tensors live ("cpu", "cuda", a
      torch.device); None = "cpu".

    `blocks()` yields (j0, j1, C[:, j0:j1].T) with the block transposed, shape (j1 - j0, n):
    rows are targets, columns are controls. A yielded block is only valid until the next one.
    """

    def __init__(
        self,
        x: np.ndarray | torch.Tensor,
        y: np.ndarray | torch.Tensor,
        *,
        x_pos: np.ndarray | None = None,
        y_pos: np.ndarray | None = None,
        spatial_weight: float = 0.0,
        spatial_scale_um: float = 100.0,
        max_distance_um: float | None = None,
        expr_scale: float | None = None,
        dtype: torch.dtype = torch.float32,
        memory_mb: float = 1024.0,
        block_mb: float = 64.0,
        device: str | torch.device | None = None,
    ):
        x64 = np.asarray(x, dtype=np.float64)
        y64 = np.asarray(y, dtype=np.float64)
        if x64.ndim != 2 or y64.ndim != 2 or x64.shape[1] != y64.shape[1]:
            raise ValueError(f"x and y must be (n, d) and (m, d); got {x64.shape} and {y64.shape}")
        if len(x64) == 0 or len(y64) == 0:
            raise ValueError("x and y must each hold at least one point")
        self.n, self.m = len(x64), len(y64)
        self.dtype = dtype
        self.device = torch.device("cpu" if device is None else device)
        self.spatial_weight = float(spatial_weight)
        self.spatial_scale_um = float(spatial_scale_um)
        self.max_distance_um = None if max_distance_um is None else float(max_distance_um)
        self.uses_positions = self.spatial_weight > 0 or self.max_distance_um is not None
        if self.uses_positions and (x_pos is None or y_pos is None):
            raise ValueError("x_pos and y_pos are needed for a spatial weight or a maximum distance")
        self.expr_scale = rms_distance(x64, y64) if expr_scale is None else float(expr_scale)
        if not self.expr_scale > 0:
            self.expr_scale = 1.0  # all points coincide: every distance is 0 whatever the scale

        shift = x64.mean(axis=0)  # centring keeps |x|^2 + |y|^2 - 2 x.y accurate in float32
        self._x = torch.as_tensor(x64 - shift, dtype=dtype, device=self.device)
        self._y = torch.as_tensor(y64 - shift, dtype=dtype, device=self.device)
        self._x_sq = (self._x * self._x).sum(1)
        self._y_sq = (self._y * self._y).sum(1)
        if self.uses_positions:
            p = np.asarray(x_pos, dtype=np.float64)
            q = np.asarray(y_pos, dtype=np.float64)
            if p.shape != (self.n, 2) or q.shape != (self.m, 2):
                raise ValueError(f"x_pos and y_pos must be (n, 2) and (m, 2); got {p.shape} and {q.shape}")
            origin = p.mean(axis=0)
            self._p = torch.as_tensor(p - origin, dtype=dtype, device=self.device)
            self._q = torch.as_tensor(q - origin, dtype=dtype, device=self.device)

        itemsize = torch.tensor([], dtype=dtype).element_size()
        self.block_rows = int(max(1, min(self.m, (block_mb * _MB) // (itemsize * self.n))))
        self._starts = list(range(0, self.m, self.block_rows))
        block_bytes = self.block_rows * self.n * itemsize
        # working buffers, in blocks: `work`, the spatial distances (which the summary pass
        # reuses for its plan block; a block of its own without positions) and the radius mask
        # (1/4: bool), plus the block being recomputed when not everything is cached
        fixed = 2.0 + (0.25 if self.max_distance_um is not None else 0.0)
        budget_blocks = memory_mb * _MB / block_bytes
        if budget_blocks >= len(self._starts) + fixed:
            self.n_cached_blocks = len(self._starts)
        else:
            self.n_cached_blocks = int(max(0.0, budget_blocks - fixed - 1.0))
        self._cache: list[torch.Tensor | None] = [None] * len(self._starts)
        # per cached block: None while it holds the cost, else (peak, dead) of the kernel it holds
        self._kernel: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(self._starts)
        empty = {"dtype": dtype, "device": self.device}
        self._buf = None if self.fully_cached else torch.empty((self.block_rows, self.n), **empty)
        self.work = torch.empty((self.block_rows, self.n), **empty)  # scratch for the solver
        if self.uses_positions:  # spatial distances; also the plan block of summarize_plan
            self._sbuf = torch.empty((self.block_rows, self.n), **empty)
        if self.max_distance_um is not None:
            self._mask = torch.empty((self.block_rows, self.n), dtype=torch.bool, device=self.device)

    @property
    def n_blocks(self) -> int:
        return len(self._starts)

    @property
    def fully_cached(self) -> bool:
        """True when the whole matrix is held in memory after the first pass."""
        return self.n_cached_blocks == self.n_blocks

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield (j0, j1, block) for consecutive target slices; block = C[:, j0:j1].T, (j1-j0, n)."""
        for _, j0, j1, block, _ in self._slots(keep_kernels=False):
            yield j0, j1, block

    def _slots(self, keep_kernels: bool):
        """Yield (k, j0, j1, tensor, cached) per block: the cost, or with `keep_kernels` the kernel a
        cached block holds (`_kernel[k]` is then not None). Without it, held kernels are
        overwritten by the recomputed cost first."""
        for k, j0 in enumerate(self._starts):
            j1 = min(j0 + self.block_rows, self.m)
            cached = self._cache[k]
            if cached is not None:
                if self._kernel[k] is not None and not keep_kernels:
                    self._fill(j0, j1, cached)
                    self._kernel[k] = None
                yield k, j0, j1, cached, True
                continue
            if k < self.n_cached_blocks:
                block = torch.empty((j1 - j0, self.n), dtype=self.dtype, device=self.device)
                self._fill(j0, j1, block)
                self._cache[k] = block
                yield k, j0, j1, block, True
            else:
                assert self._buf is not None
                block = self._buf[: j1 - j0]
                self._fill(j0, j1, block)
                yield k, j0, j1, block, False

    def _holds_kernels(self) -> bool:
        """True when every block within the cache budget is cached and holds a kernel."""
        return self.n_cached_blocks > 0 and all(
            self._cache[k] is not None and self._kernel[k] is not None for k in range(self.n_cached_blocks))

    def _fill(self, j0: int, j1: int, out: torch.Tensor) -> None:
        """Write C[:, j0:j1].T into `out` ((j1 - j0, n)) from the coordinates."""
        yb = self._y[j0:j1]
        # ||y||^2 - 2 y.x + ||x||^2, clamped at 0 against rounding, then the square root
        torch.addmm(self._y_sq[j0:j1, None], yb, self._x.T, beta=1.0, alpha=-2.0, out=out)
        out.add_(self._x_sq[None, :]).clamp_(min=0.0).sqrt_().mul_(1.0 / self.expr_scale)
        if not self.uses_positions:
            return
        c = j1 - j0
        dist, tmp = self._sbuf[:c], self.work[:c]  # positions are 2-D: exact differences are cheap
        torch.sub(self._q[j0:j1, 0:1], self._p[None, :, 0], out=dist).square_()
        torch.sub(self._q[j0:j1, 1:2], self._p[None, :, 1], out=tmp).square_()
        dist.add_(tmp).sqrt_()
        if self.max_distance_um is not None:
            mask = self._mask[:c]
            torch.gt(dist, self.max_distance_um, out=mask)
            out.masked_fill_(mask, math.inf)
        if self.spatial_weight > 0:
            out.add_(dist, alpha=self.spatial_weight / self.spatial_scale_um)

    def pair_costs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """C_ij for the given index pairs (two int arrays of equal length), float64, vectorised."""
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)
        cols = torch.as_tensor(np.asarray(cols, dtype=np.int64), device=self.device)
        x, y = self._x.double(), self._y.double()
        cost = torch.linalg.vector_norm(x[rows] - y[cols], dim=1) / self.expr_scale
        if self.uses_positions:
            dist = torch.linalg.vector_norm(self._p.double()[rows] - self._q.double()[cols], dim=1)
            if self.spatial_weight > 0:
                cost = cost + self.spatial_weight / self.spatial_scale_um * dist
            if self.max_distance_um is not None:
                cost = torch.where(dist > self.max_distance_um, math.inf, cost)
        return cost.cpu().numpy()

    def dense(self) -> np.ndarray:
        """The whole (n, m) cost matrix as float64 numpy (small problems: tests, POT comparisons)."""
        out = np.empty((self.n, self.m), dtype=np.float64)
        for j0, j1, block in self.blocks():
            out[:, j0:j1] = block.double().cpu().numpy().T
        return out


@dataclass
class SinkhornResult:
    """Dual potentials of the entropic plan and what the solve did.

    f: (n,) float64, g: (m,) float64 potentials in cost units; the plan is
      P_ij = exp((f_i + g_j - C_ij) / eps) (paper Eq. 10), with rows summing exactly to 1/n.
    marginal_error: L1 violation of the column marginal, sum_j |sum_i P_ij - 1/m| (the row
      marginal is exact); converged: marginal_error < tol.
    n_iter: iterations done (one iteration = one g and one f update).
    omega: the over-relaxation factor in use at the end (1 = plain Sinkhorn).
    """

    f: np.ndarray
    g: np.ndarray
    eps: float
    tol: float
    n_iter: int
    marginal_error: float
    converged: bool
    omega: float
    dtype: str
    blocks: int
    cached_blocks: int
    absorptions: int = 0  # passes that turned the cached cost blocks into kernels (see module doc)


def sinkhorn_log(
    cost: BlockCost,
    eps: float = 0.05,
    *,
    tol: float = 1e-5,
    max_iter: int = 5000,
    check_every: int = 10,
    omega: float | str = "auto",
) -> SinkhornResult:
    """Solve entropic OT with uniform marginals on `cost` by log-domain Sinkhorn.

    eps: entropic regularisation, in the units of the cost (dimensionless when `cost` uses its
      default RMS normalisation). tol: stop when the L1 column-marginal error is below it.
    max_iter: give up after this many iterations (warns with `SinkhornWarning`; the best
      iterate found is returned with converged=False).
    check_every: with over-relaxation, test convergence every this many iterations (plain
      Sinkhorn tests every iteration, for free).
    omega: "auto" (adaptive, safeguarded over-relaxation) or a fixed factor in [1, 2).
    """
    with torch_threads_for(cost.n * cost.m):
        return _sinkhorn(cost, eps, tol, max_iter, check_every, omega)


def _sinkhorn(cost: BlockCost, eps: float, tol: float, max_iter: int, check_every: int,
              omega: float | str) -> SinkhornResult:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    auto = omega == "auto"
    w = 1.0 if auto else float(omega)
    if not 1.0 <= w < 2.0:
        raise ValueError(f"omega must be 'auto' or in [1, 2), got {omega!r}")
    if max_iter < 1 or check_every < 1:
        raise ValueError(f"max_iter and check_every must be >= 1, got {max_iter} and {check_every}")
    n, m, dt, dev = cost.n, cost.m, cost.dtype, cost.device
    inv_eps = 1.0 / eps
    log_a, log_b = -math.log(n), -math.log(m)
    alpha = torch.zeros(n, dtype=dt, device=dev)  # f / eps
    beta = torch.zeros(m, dtype=dt, device=dev)  # g / eps
    acc = torch.empty(n, dtype=dt, device=dev)
    alpha0: torch.Tensor | None = None  # alpha when the cached kernels were absorbed
    absorptions = 0
    alpha_exact = False  # whether alpha is the exact row fit of the current beta
    tuned = not auto
    errors: dict[int, float] = {}  # iteration -> marginal error of the plan (alpha, beta) then
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    last_error = math.inf
    step_spread = math.inf  # max - min over j of the last g update; small once Sinkhorn settles
    next_report = time.perf_counter() + REPORT_EVERY_S
    for it in range(max_iter + 1):  # the extra pass only measures the last iterate
        measuring = alpha_exact
        if it == max_iter and not measuring:
            break
        beta_before = beta.clone() if measuring else beta
        fits = _ColumnFits(beta, log_b, w, measuring, final=it == max_iter)
        acc.fill_(-math.inf)
        fast = step_spread <= FAST_SPREAD  # see _row_update_from_columns
        delta = None  # alpha - alpha0 while the cached kernels can be used
        if fast and alpha0 is not None and cost._holds_kernels():
            delta = alpha - alpha0
            low, high = torch.aminmax(delta)
            if float(high) - float(low) > KERNEL_SPREAD:
                delta = None
        absorb = KERNEL_CACHE and fast and delta is None and not fits.final
        rows = _RowSums(n, dt, dev) if delta is not None else None
        if delta is not None:
            shift = float(delta.max())
            col_weight = torch.exp(delta - shift)
        for k, j0, j1, block, cached in cost._slots(keep_kernels=delta is not None):
            if delta is not None and cached:
                _sweep_kernel_block(block, cost._kernel[k], j0, col_weight, shift, fits, rows)
                continue
            into_cache = absorb and cached  # this block becomes its kernel, in place
            work = block if into_cache else cost.work[: j1 - j0]
            torch.add(alpha[None, :], block, alpha=-inv_eps, out=work)
            lse_col, peak = _lse_(work, dim=1, floor=KERNEL_FLOOR if into_cache else EXP_FLOOR)
            new_beta = fits.fit(j0, j1, lse_col)  # lse_col: log of the column sums of P, up to beta
            if new_beta is not None:
                if fast:  # work holds exp(alpha_i - C_ij / eps - peak_j): one matrix-vector product
                    torch.logaddexp(acc, _row_update_from_columns(work, new_beta + peak), out=acc)
                else:
                    torch.add(beta[j0:j1, None], block, alpha=-inv_eps, out=work)
                    torch.logaddexp(acc, _lse_(work, dim=0)[0], out=acc)
            if into_cache:
                dead = torch.isneginf(lse_col)  # columns with no finite cost: their sums stay 0
                cost._kernel[k] = (peak, dead if bool(dead.any()) else None)
        if absorb and cost._holds_kernels():
            alpha0 = alpha.clone()
            absorptions += 1
            logger.debug("sinkhorn: iteration %d absorbed the cached blocks into kernels", it)
        if rows is not None:
            assert delta is not None
            torch.logaddexp(acc, rows.log() + delta, out=acc)
        error = fits.error()
        if not fits.final:
            step_spread = fits.step_spread()

        if measuring:
            if not math.isfinite(error) and w == 1.0:
                raise FloatingPointError(f"Sinkhorn's marginal error is {error} at iteration {it}")
            errors[it] = error
            if time.perf_counter() >= next_report:  # long solves say how they are doing
                logger.info("sinkhorn %d x %d: iteration %d, marginal error %.2e (tol %.0e), omega %.2f",
                            n, m, it, error, tol, w)
                next_report = time.perf_counter() + REPORT_EVERY_S
            if best is None or error < best[0]:
                best = (error, alpha.clone(), beta_before.clone())
            if error < tol:
                return _result(alpha, beta_before, eps, tol, it, error, True, w, cost, absorptions)
            if it == max_iter:
                break
            if not math.isfinite(error) or (w > 1.0 and error > last_error):
                # over-relaxation overshot: back to the best iterate, with a gentler factor
                _, best_alpha, best_beta = best
                alpha.copy_(best_alpha)
                beta.copy_(best_beta)
                w = 1.0 + (w - 1.0) / 2.0
                if w < 1.05:
                    w, tuned = 1.0, True
                logger.debug("sinkhorn: marginal error rose at iteration %d; omega -> %.3f", it, w)
                last_error = best[0]
                alpha_exact = True
                step_spread = math.inf
                continue
            last_error = error
            if not tuned and it >= 2 * check_every and (it - check_every) in errors:
                rate = (error / errors[it - check_every]) ** (1.0 / check_every)
                if 0.0 < rate < 1.0:
                    w = min(OMEGA_MAX, 2.0 / (1.0 + math.sqrt(1.0 - rate)))
                    tuned = True
                    logger.debug("sinkhorn: plain rate %.5f; omega -> %.3f", rate, w)

        exact = w == 1.0 or (it + 1) % check_every == 0 or it + 1 == max_iter
        # fast: acc = log of the row sums of P(alpha, beta); otherwise LSE_j(beta_j - C_ij / eps)
        new_alpha = alpha + (log_a - acc) if fast else log_a - acc
        if exact:
            alpha.copy_(new_alpha)
        else:
            alpha.mul_(1.0 - w).add_(new_alpha, alpha=w)
        alpha_exact = exact

    assert best is not None  # the last iteration's f update is exact, so the extra pass measured it
    error, best_alpha, best_beta = best
    warnings.warn(
        f"Sinkhorn stopped after {max_iter} iterations with marginal error {error:.3g} > tol {tol:g}; "
        "raise max_iter, raise eps, loosen tol, or use float64",
        SinkhornWarning,
        stacklevel=3,
    )
    return _result(best_alpha, best_beta, eps, tol, max_iter, error, False, w, cost, absorptions)


class _ColumnFits:
    """The g updates of one pass, column slice by column slice, with the pass's marginal error and
    step spread kept as tensors (read once per pass: no device synchronisation per block)."""

    def __init__(self, beta: torch.Tensor, log_b: float, w: float, measuring: bool, final: bool):
        self.beta, self.log_b, self.w = beta, log_b, w
        self.measuring, self.final = measuring, final
        self.m = len(beta)
        self._errors: list[torch.Tensor] = []
        self._low: list[torch.Tensor] = []
        self._high: list[torch.Tensor] = []

    def fit(self, j0: int, j1: int, lse_col: torch.Tensor) -> torch.Tensor | None:
        """Update beta[j0:j1] from lse_col = log sum_i exp(alpha_i - C_ij / eps); return the new
        slice (None in the final, measure-only pass)."""
        old = self.beta[j0:j1]
        if self.measuring:  # column sums of the current plan: the marginal error, for free
            self._errors.append((torch.exp(old + lse_col) - 1.0 / self.m).abs().sum(dtype=torch.float64))
            if self.final:
                return None
        new = self.log_b - lse_col
        if self.w != 1.0:
            new = (1.0 - self.w) * old + self.w * new
        low, high = torch.aminmax(new - old)
        self._low.append(low)
        self._high.append(high)
        old.copy_(new)
        return new

    def error(self) -> float:
        return float(torch.stack(self._errors).sum()) if self._errors else 0.0

    def step_spread(self) -> float:
        return float(torch.stack(self._high).max() - torch.stack(self._low).min())


class _RowSums:
    """sum_j K_ji exp(v_j) over the chunks of a pass, accumulated linearly against the running
    maximum of v (one matrix-vector product per chunk instead of a log-sum-exp of n terms)."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.total = torch.zeros(n, dtype=dtype, device=device)
        self.ref = -math.inf

    def add(self, kernel: torch.Tensor, log_weight: torch.Tensor) -> None:
        top = float(log_weight.max())
        if top == -math.inf:
            return
        if top > self.ref:
            if self.ref > -math.inf:
                self.total.mul_(math.exp(self.ref - top))
            self.ref = top
        relative = log_weight - self.ref
        weight = torch.exp(relative)
        if weight.dtype == torch.float32:  # as in _row_update_from_columns
            weight = torch.where(relative < -27.0, torch.zeros_like(weight), weight)
        self.total.addmv_(kernel.T, weight)

    def log(self) -> torch.Tensor:
        return self.total.log().add_(self.ref)


def _sweep_kernel_block(kernel: torch.Tensor, held: tuple[torch.Tensor, torch.Tensor | None] | None, j0: int,
                        col_weight: torch.Tensor, shift: float, fits: _ColumnFits, rows: _RowSums | None) -> None:
    """One pass over a cached block holding K_ji = exp(max(alpha0_i - C_ij / eps - peak_j, -KERNEL_FLOOR)).

    col_weight = exp(alpha - alpha0 - shift) (max 1), so the column log-sums of P up to beta are
    log(K col_weight) + shift + peak: one matrix-vector product; the row sums of P with the new
    beta are one more, K^T exp(beta + peak), added to `rows` (the caller adds alpha - alpha0).
    On CPU the block is swept in chunks of KERNEL_CHUNK_BYTES, so that the second product reads
    the chunk from cache. Precision: a kernel entry clamped at e^-80 of its column's largest
    (at alpha0) weighs at most e^(-80 + KERNEL_SPREAD) = e^-60 of the column sum now (n e^-60
    for a whole column, as for a log-sum-exp), and the bound of _row_update_from_columns holds
    with 80 - KERNEL_SPREAD = 60 in place of its 60 (m^2 e^-50: under 1e-8 up to m = 10^7).
    """
    assert held is not None
    peak, dead = held
    c = kernel.shape[0]
    if kernel.device.type == "cpu":
        chunk = max(1, KERNEL_CHUNK_BYTES // (kernel.element_size() * kernel.shape[1]))
    else:
        chunk = c
    for s0 in range(0, c, chunk):
        s1 = min(c, s0 + chunk)
        part, part_peak = kernel[s0:s1], peak[s0:s1]
        lse_col = torch.mv(part, col_weight).log_().add_(part_peak).add_(shift)
        if dead is not None:
            lse_col.masked_fill_(dead[s0:s1], -math.inf)
        new_beta = fits.fit(j0 + s0, j0 + s1, lse_col)
        if new_beta is not None and rows is not None:
            rows.add(part, new_beta + part_peak)


def _lse_(work: torch.Tensor, dim: int, floor: float = EXP_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """log-sum-exp of `work` along `dim` and the shift used; `work` is left holding exp(work - shift).

    After subtracting the maximum (the shift; 0 for all -inf slices, whose result is -inf),
    terms are clamped at -floor (EXP_FLOOR = 60) before exp: they add at most n * exp(-60) ~
    1e-26 * n relative to the largest term, and torch's vectorised exp is ~6x slower on arguments
    below about -87 (where float32 underflows), which are most entries of a sharp plan. Blocks
    that become cached kernels use KERNEL_FLOOR = 80 (see _sweep_kernel_block).
    """
    peak = work.amax(dim=dim, keepdim=True)
    finite = torch.isfinite(peak)
    peak = torch.where(finite, peak, torch.zeros_like(peak))
    work.sub_(peak).clamp_(min=-floor).exp_()
    out = work.sum(dim=dim).log_().add_(peak.squeeze(dim))
    return torch.where(finite.squeeze(dim), out, -math.inf), peak.squeeze(dim)


def _row_update_from_columns(stabilised: torch.Tensor, log_weight: torch.Tensor) -> torch.Tensor:
    """log sum_j P_ij over a block from the column pass's exponentials, by one mat-vec product.

    stabilised: (c, n) exp(alpha_i - C_ij / eps - peak_j) left by `_lse_` (dim 1), in [e^-60, 1];
    log_weight: (c,) beta_j + peak_j, so that stabilised_ji * exp(log_weight_j) = P_ij.
    Returns (n,) log sum_{j in block} P_ij: the row update needs no second exp pass.

    Exact up to the clamp at e^-60: an entry's error is at most e^-60 of its column's largest
    entry. Rows hold equal mass 1/n, so no entry exceeds 1/n and every row's largest entry is
    at least 1/(n m): at least 1/m of any column's largest. The relative error of a row sum is
    then below m^2 e^-60 times the spread of the weights, exp(max - min of the last g step). The
    solver uses this path only once that step spread is <= FAST_SPREAD (10): the bound is then
    e^-30 * m^2, under 1e-8 up to m = 100,000. In float32, weights under e^-27 of the largest
    are dropped (their products would be subnormal, which is slow); they add < m e^-27 of a row.
    """
    top = log_weight.max()
    weight = torch.exp(log_weight - top)
    if stabilised.dtype == torch.float32:
        weight = torch.where(log_weight - top < -27.0, torch.zeros_like(weight), weight)
    return torch.mv(stabilised.T, weight).log_().add_(top)


def _result(alpha, beta, eps, tol, n_iter, error, converged, w, cost: BlockCost, absorptions: int) -> SinkhornResult:
    return SinkhornResult(
        f=alpha.double().cpu().numpy() * eps,
        g=beta.double().cpu().numpy() * eps,
        eps=eps,
        tol=tol,
        n_iter=int(n_iter),
        marginal_error=float(error),
        converged=bool(converged),
        omega=float(w),
        dtype=str(cost.dtype).replace("torch.", ""),
        blocks=cost.n_blocks,
        cached_blocks=cost.n_cached_blocks,
        absorptions=absorptions,
    )


@dataclass
class PlanSummary:
    """The hard assignment and summary statistics of an entropic plan (one pass over C).

    target: (n,) int64, pi(i) = argmax_j P_ij (paper, after Eq. 10; ties -> lowest j).
    plan_value: (n,) float64, P_{i, pi(i)}.
    row_mass: (n,), col_mass: (m,) float64 marginals of P.
    transport_cost: <P, C>. entropy: H(P) = -sum P log P. total_mass: sum P.
    """

    target: np.ndarray
    plan_value: np.ndarray
    row_mass: np.ndarray
    col_mass: np.ndarray
    transport_cost: float
    entropy: float
    total_mass: float


def summarize_plan(cost: BlockCost, result: SinkhornResult) -> PlanSummary:
    """Hard assignment pi(i) = argmax_j P_ij with its plan value, marginals, <P, C> and H(P).

    Computed blockwise like the solve, so the plan is never held whole.
    """
    with torch_threads_for(cost.n * cost.m):
        return _summarize_plan(cost, result)


def _summarize_plan(cost: BlockCost, result: SinkhornResult) -> PlanSummary:
    inv_eps = 1.0 / result.eps
    dev = cost.device
    alpha = torch.as_tensor(result.f * inv_eps, dtype=cost.dtype, device=dev)
    beta = torch.as_tensor(result.g * inv_eps, dtype=cost.dtype, device=dev)
    best = torch.full((cost.n,), -math.inf, dtype=cost.dtype, device=dev)
    arg = torch.zeros(cost.n, dtype=torch.int64, device=dev)
    row_mass = torch.zeros(cost.n, dtype=torch.float64, device=dev)
    col_mass = torch.zeros(cost.m, dtype=torch.float64, device=dev)
    # the plan block: the spatial-distance buffer is free once a block has been served
    plan = cost._sbuf if cost.uses_positions else torch.empty_like(cost.work)
    plogp = 0.0
    for j0, j1, block in cost.blocks():
        c = j1 - j0
        log_p, p = cost.work[:c], plan[:c]
        torch.add(alpha[None, :], block, alpha=-inv_eps, out=log_p)
        log_p.add_(beta[j0:j1, None])
        value, index = log_p.max(dim=0)
        better = value > best
        best = torch.where(better, value, best)
        arg = torch.where(better, index + j0, arg)
        excluded = torch.isinf(log_p) if cost.max_distance_um is not None else None
        torch.exp(log_p.clamp_(min=-EXP_FLOOR), out=p)  # raises P < exp(-60) to it: <= n m 1e-26 of mass
        if excluded is not None:
            p.masked_fill_(excluded, 0.0)
        # per-block sums in the block's dtype (a float64 sum would copy the block), totals in float64
        row_mass += p.sum(dim=0)
        col_mass[j0:j1] = p.sum(dim=1)
        plogp += float(p.mul_(log_p).sum(dim=1).double().sum())  # log_p is finite after the clamp
    a64, b64 = alpha.double(), beta.double()
    # log P = alpha + beta - C / eps, so <P, C> = eps * (sum_i alpha_i r_i + sum_j beta_j c_j - sum P log P)
    transport = result.eps * (float(a64 @ row_mass) + float(b64 @ col_mass) - plogp)
    return PlanSummary(
        target=arg.cpu().numpy(),
        plan_value=np.exp(best.double().cpu().numpy()),
        row_mass=row_mass.cpu().numpy(),
        col_mass=col_mass.cpu().numpy(),
        transport_cost=transport,
        entropy=-plogp,
        total_mass=float(row_mass.sum()),
    )


def plan_values(cost: BlockCost, result: SinkhornResult, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """P_ij for the given index pairs (float64), from the potentials and `BlockCost.pair_costs`."""
    c = cost.pair_costs(rows, cols)
    return np.exp((result.f[rows] + result.g[cols] - c) / result.eps)
