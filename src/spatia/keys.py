"""Names shared by every stage: levels, split labels, AnnData keys.

One home for the strings and codes that cross package borders, so that a dataset written by
`mist`, a batch read by `train`, an AnnData written by `embed` and a report written by
`evaluate` agree by construction (the pattern of scvi-tools' `_constants.py`).
"""

from __future__ import annotations

from typing import Final

# --- levels of the multi-scale dataset (MIST) and model --------------------------------------
CELL: Final = "cell"
NICHE: Final = "niche"
TISSUE: Final = "tissue"
LEVELS: Final = (CELL, NICHE, TISSUE)

# --- split labels -----------------------------------------------------------------------------
# Stored as int8 codes in the MIST index tables, as strings in AnnData obs and reports.
TRAIN: Final = "train"
VAL: Final = "val"
TEST: Final = "test"
BUFFER: Final = "buffer"  # train-side cells too close to a val/test block: never trained on
SPLIT_NAMES: Final = (TRAIN, VAL, TEST, BUFFER)
SPLIT_CODES: Final = {name: code for code, name in enumerate(SPLIT_NAMES)}  # train 0 ... buffer 3
# Train cells closer than this to a val/test cell are `buffer`, in `spatia build` and in
# `spatia evaluate`'s own split alike: one 256 px niche tile at Xenium's 0.2125 um/px is 54.4 um
# wide, so with 60 um no niche holds both a trained-on cell and a test cell.
SPLIT_BUFFER_UM: Final = 60.0

# --- AnnData keys -----------------------------------------------------------------------------
SPATIAL_KEY: Final = "spatial"            # obsm: cell centroids (x_um, y_um)
COUNTS_LAYER: Final = "counts"            # layers: raw counts when .X holds something else
UNS_KEY: Final = "spatia"                 # uns: provenance (stage, config, versions)

# obsm keys of the embeddings `spatia embed` writes, by what they hold.
X_SPATIA: Final = "X_spatia"              # unified embedding z (paper Eq. 4)
X_SPATIA_CELL: Final = "X_spatia_cell"    # cell level z_cell (image-gene fusion)
X_SPATIA_NICHE: Final = "X_spatia_niche"  # niche level (shared by the cells of a niche)
X_SPATIA_TISSUE: Final = "X_spatia_tissue"  # tissue level (shared by the cells of a region)
X_SPATIA_IMAGE: Final = "X_spatia_image"  # unified embedding with genes withheld (image only)
X_SPATIA_IMAGE_CELL: Final = "X_spatia_image_cell"  # its cell level: the image-only cell representation
X_SPATIA_GENE: Final = "X_spatia_gene"    # unified embedding with images withheld (gene only)
EMBEDDING_KEYS: Final = (X_SPATIA, X_SPATIA_CELL, X_SPATIA_NICHE, X_SPATIA_TISSUE, X_SPATIA_IMAGE, X_SPATIA_GENE)
# model output name -> obsm key
EMBEDDING_KEY_OF_OUTPUT: Final = {"z": X_SPATIA, "z_cell": X_SPATIA_CELL, "z_niche": X_SPATIA_NICHE,
                                  "z_tissue": X_SPATIA_TISSUE}
# `spatia embed --modality` -> obsm key of its unified embedding
EMBEDDING_KEY_OF_MODALITY: Final = {"both": X_SPATIA, "image": X_SPATIA_IMAGE, "gene": X_SPATIA_GENE}
# `spatia embed --modality` -> model output name -> obsm key: X_spatia, X_spatia_cell, ... for
# "both"; X_spatia_image, X_spatia_image_cell, ... for "image" (so the files of several
# modalities merge without clobbering each other's keys)
EMBEDDING_KEYS_OF_MODALITY: Final = {
    modality: {output: base + key.removeprefix(X_SPATIA) for output, key in EMBEDDING_KEY_OF_OUTPUT.items()}
    for modality, base in EMBEDDING_KEY_OF_MODALITY.items()}
# obs of every `spatia embed` output: which cells got an embedding, and why the others did not
# (the MIST build's skip reason, e.g. "zero_counts"; their obsm embedding rows are NaN)
EMBEDDED_FLAG: Final = "spatia_embedded"
SKIP_REASON: Final = "spatia_skip_reason"
EMBEDDING_LABELS: Final = {
    X_SPATIA: "SPATIA (unified)",
    X_SPATIA_CELL: "SPATIA cell level (no niche/tissue)",
    X_SPATIA_NICHE: "SPATIA niche level",
    X_SPATIA_TISSUE: "SPATIA tissue level",
    X_SPATIA_IMAGE: "SPATIA image-only",
    X_SPATIA_IMAGE_CELL: "SPATIA image-only cell level",
    X_SPATIA_GENE: "SPATIA gene-only",
}

# --- files every stage writes -----------------------------------------------------------------
RUN_RECORD_NAME: Final = "spatia_run.json"
