"""MIST: the multi-scale (cell / niche / tissue-region) dataset built from Xenium bundles.

Build with `build_dataset` (or `spatia build`), read with `CellDataset`, `NicheDataset`,
`TissueDataset` and `MultiScaleDataset` + `LocalizedBatchSampler` + `collate_multiscale`.
The formats, rules and the batch contract are documented in docs/mist.md. Names load on first
use, so importing `spatia.mist` (e.g. in a build worker process) stays light.
"""

from __future__ import annotations

from spatia.lazy import lazy_getattr

_LAZY = {
    "SKIP_REASONS": "spatia.mist.build",
    "BuildSummary": "spatia.mist.build",
    "ChunkDone": "spatia.mist.build",
    "build_dataset": "spatia.mist.build",
    "BuildConfig": "spatia.mist.config",
    "Record": "spatia.mist.store",
    "decode_record": "spatia.mist.store",
    "read_manifest": "spatia.mist.store",
    "CellDataset": "spatia.mist.datasets",
    "NicheDataset": "spatia.mist.datasets",
    "TissueDataset": "spatia.mist.datasets",
    "MultiScaleDataset": "spatia.mist.datasets",
    "MultiScaleKey": "spatia.mist.datasets",
    "collate_multiscale": "spatia.mist.datasets",
    "LocalizedBatchSampler": "spatia.mist.samplers",
    "dataset_info": "spatia.mist.info",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr("spatia.mist", _LAZY)
