"""Shared test fixtures.

`real_bundle` is the real Xenium section in ../shared/data (never copied into this repository);
tests that need it are skipped, with a reason, when ../shared is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_BUNDLE = REPO_ROOT.parent / "shared" / "data" / "xenium_bone_marrow_region1"


@pytest.fixture(scope="session")
def real_bundle() -> Path:
    """Path to ../shared/data/xenium_bone_marrow_region1 (read-only; never modify it)."""
    if not (REAL_BUNDLE / "cells.parquet").exists():
        pytest.skip(f"real Xenium bundle not found at {REAL_BUNDLE}")
    return REAL_BUNDLE


@pytest.fixture(scope="session")
def simulated_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3,000-cell simulated Xenium bundle (layout v1, seed 0) with ground_truth.parquet and
    ground_truth.json, written once per session (a few seconds). Read-only for tests."""
    from spatia.sim import SimulationConfig, simulate_bundle

    out = tmp_path_factory.mktemp("simulated") / "bundle"
    simulate_bundle(out, SimulationConfig(n_cells=3000), seed=0)
    return out


@pytest.fixture(scope="session")
def bundle_both_segmentations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 600-cell simulated bundle (seed 5) with its segmentation both as Parquet polygons and as
    cells.zarr.zip (what spatialdata-io's reader needs). Read-only: copy it (helpers.copy_bundle)
    to damage it."""
    from spatia.sim import SimulationConfig, simulate_bundle

    out = tmp_path_factory.mktemp("both_segmentations") / "bundle"
    simulate_bundle(out, SimulationConfig(n_cells=600, n_genes=140, segmentation_format="both"), seed=5)
    return out


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op torch thread per test process: two xdist workers share two cores, and
    oversubscribed threads make torch ~10x slower there."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def simulated_mist(simulated_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MIST dataset of `simulated_bundle` (CPU preset, seed 0), built once per test process.
    Read-only for tests: a test that writes into a dataset builds its own."""
    from spatia.mist import BuildConfig, build_dataset

    root = tmp_path_factory.mktemp("simulated_mist") / "mist"
    build_dataset([simulated_bundle], root, BuildConfig.cpu(), seed=0)
    return root


@pytest.fixture(scope="session")
def simulated_checkpoint(simulated_mist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step joint (all levels) tiny pretraining checkpoint on `simulated_mist`: plumbing,
    not learning (tests of learning train their own). It embeds each crop in one orientation
    (`helpers.plumbing_config`); pass `orientations=8` to embed over the eight."""
    from helpers import plumbing_config

    from spatia.train import pretrain

    out = tmp_path_factory.mktemp("simulated_checkpoint") / "joint"
    overrides = dict(cells_per_tissue=8, max_steps=2, val_batches=0, log_every_n_steps=1, checkpoint_every_n_steps=1)
    return pretrain(simulated_mist, out, config=plumbing_config(), train_overrides=overrides, threads=1,
                    progress_bar=False).last_checkpoint
