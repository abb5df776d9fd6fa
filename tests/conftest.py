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
