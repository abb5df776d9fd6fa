"""The blockwise log-domain Sinkhorn solver against POT and against known answers."""

from __future__ import annotations

import importlib
import math
import warnings

import numpy as np
import ot
import pytest
import torch

from spatia.perturb.sinkhorn import (
    BlockCost,
    SinkhornWarning,
    plan_values,
    rms_distance,
    sinkhorn_log,
    summarize_plan,
)


def _clouds(n: int, m: int, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, d)) * 2.0
    x = centers[rng.integers(0, 4, n)] + rng.normal(size=(n, d))
    y = centers[rng.integers(0, 4, m)] + rng.normal(size=(m, d)) + 0.3
    px = rng.uniform(0, 400, (n, 2))
    py = rng.uniform(0, 400, (m, 2))
    return x, y, px, py


def _plan(cost: BlockCost, result) -> np.ndarray:
    return np.exp((result.f[:, None] + result.g[None, :] - cost.dense()) / result.eps)


def _pot_plan(cost_matrix: np.ndarray, eps: float) -> np.ndarray:
    n, m = cost_matrix.shape
    return ot.sinkhorn(np.full(n, 1 / n), np.full(m, 1 / m), cost_matrix, eps, method="sinkhorn_log",
                       stopThr=1e-14, numItermax=200_000)


@pytest.mark.parametrize("spatial_weight", [0.0, 0.5])
@pytest.mark.parametrize("omega", [1.0, "auto"])
def test_float64_plan_matches_pot(spatial_weight, omega):
    x, y, px, py = _clouds(90, 120)
    cost = BlockCost(x, y, x_pos=px, y_pos=py, spatial_weight=spatial_weight, dtype=torch.float64)
    result = sinkhorn_log(cost, 0.05, tol=1e-11, omega=omega)
    assert result.converged and result.marginal_error < 1e-11
    plan = _plan(cost, result)
    reference = _pot_plan(cost.dense(), 0.05)
    assert np.abs(plan - reference).max() <= 1e-6 * reference.max()
    # rows are exact after the last f update; columns within tol (L1)
    assert np.abs(plan.sum(1) - 1 / 90).max() < 1e-14
    assert np.abs(plan.sum(0) - 1 / 120).sum() < 1e-11


def test_float32_plan_close_to_pot_and_marginals_within_tol():
    x, y, px, py = _clouds(150, 110, seed=1)
    cost = BlockCost(x, y, x_pos=px, y_pos=py, spatial_weight=0.2, dtype=torch.float32)
    result = sinkhorn_log(cost, 0.05, tol=1e-5)
    assert result.converged and result.marginal_error < 1e-5 and result.dtype == "float32"
    plan = _plan(cost, result)
    reference = _pot_plan(BlockCost(x, y, x_pos=px, y_pos=py, spatial_weight=0.2, dtype=torch.float64).dense(), 0.05)
    assert np.abs(plan - reference).max() <= 1e-3 * reference.max()
    assert np.abs(plan.sum(0) - 1 / 110).sum() < 2e-5  # tol, plus float32 rounding of the recomputation
    summary = summarize_plan(cost, result)
    assert np.array_equal(summary.target, reference.argmax(1))


def test_cost_matches_its_definition():
    x, y, px, py = _clouds(40, 30)
    cost = BlockCost(x, y, x_pos=px, y_pos=py, spatial_weight=0.3, spatial_scale_um=50.0, dtype=torch.float64)
    expr = np.linalg.norm(x[:, None] - y[None], axis=2)
    space = np.linalg.norm(px[:, None] - py[None], axis=2)
    assert cost.expr_scale == pytest.approx(np.sqrt((expr**2).mean()), rel=1e-12)
    np.testing.assert_allclose(cost.dense(), expr / cost.expr_scale + 0.3 * space / 50.0, rtol=1e-9, atol=1e-9)
    rows, cols = np.array([0, 5, 39]), np.array([29, 0, 7])
    np.testing.assert_allclose(cost.pair_costs(rows, cols), cost.dense()[rows, cols], rtol=1e-12)
    assert rms_distance(x, y) == pytest.approx(cost.expr_scale)


def test_blockwise_recomputation_equals_cached_solve():
    """A tiny memory budget forces every block to be recomputed each pass: same answer."""
    x, y, px, py = _clouds(300, 260, seed=2)
    kwargs = dict(x_pos=px, y_pos=py, spatial_weight=0.1, dtype=torch.float64)
    cached = BlockCost(x, y, **kwargs)
    streamed = BlockCost(x, y, memory_mb=0.05, block_mb=0.05, **kwargs)
    assert cached.fully_cached and cached.n_blocks == 1
    assert streamed.n_blocks > 5 and streamed.n_cached_blocks == 0
    a = sinkhorn_log(cached, 0.05, tol=1e-10)
    b = sinkhorn_log(streamed, 0.05, tol=1e-10)
    assert a.converged and b.converged
    np.testing.assert_allclose(_plan(cached, a), _plan(streamed, b), rtol=1e-7, atol=1e-14)
    sa, sb = summarize_plan(cached, a), summarize_plan(streamed, b)
    assert np.array_equal(sa.target, sb.target)
    assert sa.transport_cost == pytest.approx(sb.transport_cost, rel=1e-9)
    assert sa.entropy == pytest.approx(sb.entropy, rel=1e-9)


def test_partial_cache_mixes_cached_and_recomputed_blocks():
    x, y, px, py = _clouds(200, 240, seed=3)
    block_mb = 200 * 20 * 8 / 2**20  # 20 target columns per block in float64
    cost = BlockCost(x, y, dtype=torch.float64, memory_mb=block_mb * 7, block_mb=block_mb)
    assert 0 < cost.n_cached_blocks < cost.n_blocks
    first = cost.dense()
    np.testing.assert_array_equal(first, cost.dense())  # cached and recomputed blocks agree on a second pass
    result = sinkhorn_log(cost, 0.05, tol=1e-10)
    np.testing.assert_allclose(_plan(cost, result), _pot_plan(first, 0.05), rtol=1e-5, atol=1e-12)


def test_matrix_vector_row_update_equals_log_sum_exp(monkeypatch):
    """Once Sinkhorn settles, rows are updated from the column pass by one mat-vec product;
    forcing the two-log-sum-exp path everywhere gives the same iterates."""
    module = importlib.import_module("spatia.perturb.sinkhorn")  # the module, not the function name

    x, y, px, py = _clouds(120, 90, seed=10)
    cost = BlockCost(x, y, x_pos=px, y_pos=py, spatial_weight=0.3, dtype=torch.float64, block_mb=0.02)
    calls = {"n": 0}
    original = module._row_update_from_columns

    def counted(*args):
        calls["n"] += 1
        return original(*args)

    monkeypatch.setattr(module, "_row_update_from_columns", counted)
    monkeypatch.setattr(module, "KERNEL_CACHE", False)  # the cached-kernel sweep has its own test
    fast = sinkhorn_log(cost, 0.05, tol=1e-11, omega=1.0)
    assert calls["n"] > 0.8 * fast.n_iter * cost.n_blocks
    monkeypatch.setattr(module, "FAST_SPREAD", -1.0)
    slow = sinkhorn_log(cost, 0.05, tol=1e-11, omega=1.0)
    assert fast.n_iter == slow.n_iter
    np.testing.assert_allclose(fast.f, slow.f, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fast.g, slow.g, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel_spread", [20.0, 0.5])
def test_cached_kernel_sweep_equals_log_domain_iterates(monkeypatch, kernel_spread):
    """Once settled, cached blocks hold the stabilised kernel and an iteration is two mat-vec
    products; switching that off (every pass a log-sum-exp over the cost) gives the same
    iterates, also when a small KERNEL_SPREAD forces re-absorption over and over, and with a
    partial cache (kernel blocks and recomputed cost blocks in one pass)."""
    module = importlib.import_module("spatia.perturb.sinkhorn")
    monkeypatch.setattr(module, "KERNEL_SPREAD", kernel_spread)
    x, y, px, py = _clouds(140, 110, seed=11)
    block_mb = 140 * 20 * 8 / 2**20  # 20 target columns per block in float64
    cost = BlockCost(x, y, x_pos=px, y_pos=py, spatial_weight=0.3, dtype=torch.float64,
                     memory_mb=block_mb * 7, block_mb=block_mb)
    assert 0 < cost.n_cached_blocks < cost.n_blocks
    before = cost.dense()
    with_kernels = sinkhorn_log(cost, 0.05, tol=1e-11, omega="auto")
    assert with_kernels.absorptions >= (3 if kernel_spread < 1 else 1)
    assert any(held is not None for held in cost._kernel)  # the solve ended on cached kernels
    np.testing.assert_array_equal(cost.dense(), before)  # blocks() serves the cost again
    monkeypatch.setattr(module, "KERNEL_CACHE", False)
    plain = sinkhorn_log(cost, 0.05, tol=1e-11, omega="auto")
    assert plain.absorptions == 0 and plain.n_iter == with_kernels.n_iter
    np.testing.assert_allclose(with_kernels.f, plain.f, rtol=0, atol=1e-12)
    np.testing.assert_allclose(with_kernels.g, plain.g, rtol=0, atol=1e-12)
    np.testing.assert_allclose(_plan(cost, with_kernels), _pot_plan(before, 0.05), rtol=1e-5, atol=1e-12)


def test_float32_cached_kernels_match_pot():
    """The float32 kernel sweep on a multi-block, fully cached problem: plan within 1e-3 of POT's."""
    x, y, px, py = _clouds(200, 180, seed=12)
    cost = BlockCost(x, y, x_pos=px, y_pos=py, spatial_weight=0.2, block_mb=200 * 30 * 4 / 2**20)
    assert cost.fully_cached and cost.n_blocks == 6
    result = sinkhorn_log(cost, 0.05, tol=1e-5)
    assert result.converged and result.absorptions >= 1
    plan = _plan(cost, result)
    reference = _pot_plan(BlockCost(x, y, x_pos=px, y_pos=py, spatial_weight=0.2, dtype=torch.float64).dense(), 0.05)
    assert np.abs(plan - reference).max() <= 1e-3 * reference.max()
    assert np.array_equal(summarize_plan(cost, result).target, reference.argmax(1))


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"),
                                    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="no CUDA device"))])
def test_device_argument(device):
    """The same solve on an explicit device gives the default (CPU) answer."""
    x, y, px, py = _clouds(120, 100, seed=13)
    kwargs = {"x_pos": px, "y_pos": py, "spatial_weight": 0.2, "dtype": torch.float64, "block_mb": 0.05}
    reference_cost = BlockCost(x, y, **kwargs)
    reference = sinkhorn_log(reference_cost, 0.05, tol=1e-10)
    cost = BlockCost(x, y, device=device, **kwargs)
    assert cost.device == torch.device(device) and cost.work.device.type == torch.device(device).type
    result = sinkhorn_log(cost, 0.05, tol=1e-10)
    assert result.converged and result.n_iter == reference.n_iter
    np.testing.assert_allclose(result.f, reference.f, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.g, reference.g, rtol=0, atol=1e-10)
    summary, expected = summarize_plan(cost, result), summarize_plan(reference_cost, reference)
    assert np.array_equal(summary.target, expected.target)
    np.testing.assert_allclose(plan_values(cost, result, np.array([0, 5]), np.array([7, 99])),
                               plan_values(reference_cost, reference, np.array([0, 5]), np.array([7, 99])), rtol=1e-9)


def test_summary_against_dense_plan():
    x, y, px, py = _clouds(80, 100, seed=4)
    cost = BlockCost(x, y, x_pos=px, y_pos=py, spatial_weight=0.2, dtype=torch.float64, block_mb=0.02)
    result = sinkhorn_log(cost, 0.05, tol=1e-11)
    plan, c = _plan(cost, result), cost.dense()
    summary = summarize_plan(cost, result)
    assert np.array_equal(summary.target, plan.argmax(1))
    np.testing.assert_allclose(summary.plan_value, plan.max(1), rtol=1e-10)
    assert summary.transport_cost == pytest.approx((plan * c).sum(), rel=1e-10)
    assert summary.entropy == pytest.approx(-(plan * np.log(plan)).sum(), rel=1e-10)
    np.testing.assert_allclose(summary.col_mass, plan.sum(0), rtol=1e-10)
    assert summary.total_mass == pytest.approx(1.0, abs=1e-10)
    rows, cols = np.array([3, 7, 79]), np.array([0, 99, 50])
    np.testing.assert_allclose(plan_values(cost, result, rows, cols), plan[rows, cols], rtol=1e-9)


def test_permuted_copy_is_matched_to_itself():
    """Known answer: with small eps, OT between a cloud and a shuffled copy is the shuffle."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(120, 6))
    perm = rng.permutation(120)
    cost = BlockCost(x, x[perm], dtype=torch.float64)
    result = sinkhorn_log(cost, 0.01, tol=1e-8)
    target = summarize_plan(cost, result).target
    assert np.array_equal(perm[target], np.arange(120))


def test_cost_normalisation_makes_eps_scale_free():
    """Scaling the expression coordinates by 1000 changes nothing: eps is relative to the RMS distance."""
    x, y, _, _ = _clouds(60, 70, seed=6)
    plans = []
    for scale in (1.0, 1000.0):
        cost = BlockCost(x * scale, y * scale, dtype=torch.float64)
        plans.append(_plan(cost, sinkhorn_log(cost, 0.05, tol=1e-11)))
    np.testing.assert_allclose(plans[0], plans[1], rtol=1e-7, atol=1e-15)


def test_radius_excludes_far_pairs():
    x, y, px, py = _clouds(100, 100, seed=7)
    py = px + np.random.default_rng(7).normal(scale=20.0, size=px.shape)  # every control has a near target
    cost = BlockCost(x, y, x_pos=px, y_pos=py, max_distance_um=150.0, dtype=torch.float64)
    c = cost.dense()
    far = np.linalg.norm(px[:, None] - py[None], axis=2) > 150.0
    assert far.any() and np.isinf(c[far]).all() and np.isfinite(c[~far]).all()
    result = sinkhorn_log(cost, 0.05, tol=1e-9)
    assert result.converged
    summary = summarize_plan(cost, result)
    assert not far[np.arange(100), summary.target].any()
    assert math.isfinite(summary.transport_cost) and math.isfinite(summary.entropy)
    plan = np.exp((result.f[:, None] + result.g[None, :] - c) / result.eps)
    assert plan[far].max() == 0.0
    assert np.abs(plan.sum(0) - 0.01).sum() < 1e-9


def test_overrelaxation_is_faster_and_backs_off_when_it_overshoots():
    """Same plan as plain Sinkhorn in fewer iterations; a fixed omega of 1.8 from the start
    overshoots on this clustered problem, and the safeguard lowers it until it converges."""
    x, y, _, _ = _clouds(150, 150, d=8, seed=8)
    cost = BlockCost(x, y, dtype=torch.float64)
    plain = sinkhorn_log(cost, 0.02, tol=1e-8, omega=1.0)
    auto = sinkhorn_log(cost, 0.02, tol=1e-8, omega="auto")
    fixed = sinkhorn_log(cost, 0.02, tol=1e-8, omega=1.8)
    assert plain.converged and auto.converged and fixed.converged
    assert auto.omega > 1.0 and 3 * auto.n_iter < plain.n_iter
    assert fixed.omega < 1.8
    reference = _plan(cost, plain)
    for result in (auto, fixed):
        np.testing.assert_allclose(_plan(cost, result), reference, rtol=1e-5, atol=1e-12)


def test_not_converging_warns_and_reports():
    x, y, px, py = _clouds(60, 60, seed=9)
    cost = BlockCost(x, y, x_pos=px, y_pos=py, spatial_weight=2.0, dtype=torch.float64)
    with pytest.warns(SinkhornWarning, match="marginal error"):
        result = sinkhorn_log(cost, 0.01, tol=1e-12, max_iter=3, omega=1.0)
    assert not result.converged and result.n_iter == 3
    assert result.marginal_error > 1e-12 and math.isfinite(result.marginal_error)
    plan = _plan(cost, result)
    assert np.abs(plan.sum(1) - 1 / 60).max() < 1e-12  # the returned iterate still has exact rows
    assert np.abs(plan.sum(0) - 1 / 60).sum() == pytest.approx(result.marginal_error, rel=1e-6)


def test_bad_arguments_raise():
    x, y, _, _ = _clouds(10, 10)
    cost = BlockCost(x, y)
    with pytest.raises(ValueError):
        sinkhorn_log(cost, 0.0)
    with pytest.raises(ValueError):
        sinkhorn_log(cost, 0.05, omega=2.5)
    with pytest.raises(ValueError):
        BlockCost(x, y, spatial_weight=1.0)  # positions needed
    with pytest.raises(ValueError):
        BlockCost(x, y[:, :3])


def test_small_problems_leave_torch_threads_as_they_were():
    before = torch.get_num_threads()
    x, y, _, _ = _clouds(30, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn_log(BlockCost(x, y), 0.05)
    assert torch.get_num_threads() == before
