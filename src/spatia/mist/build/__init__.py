"""`build_dataset`: Xenium bundles -> one MIST dataset directory (cells, niches, tissue regions).

Modules, by job (the steps are described in `spatia.mist.build.run` and docs/mist.md):
- `sources`: loading each slide and the fingerprints (SHA-256 of its files) a resume must match;
- `plan`: per slide, which cells are kept and why not, crop geometry and scale, intensity range,
  grids and split (`plan_slide`, `SKIP_REASONS`);
- `ids`: record keys of cells, niches, tissue regions and chunks;
- `jobs`: one render job per chunk (its image window and inputs), rendered by `spatia.mist.render`;
- `stores`: the LMDB stores, committed in groups, and the progress store;
- `index`: the cell, niche and tissue index tables;
- `checks`: refusing inputs that would give a wrong or empty dataset;
- `output`: the output directory (refusals, resume state, clean-up, write errors);
- `run`: `build_dataset`, tying them together and writing the manifest last.
"""

from spatia.mist.build.plan import SKIP_REASONS
from spatia.mist.build.run import BuildSummary, ChunkDone, build_dataset

__all__ = ["SKIP_REASONS", "BuildSummary", "ChunkDone", "build_dataset"]
