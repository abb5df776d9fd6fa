"""Downstream evaluation: SPATIA embeddings against baselines, one spatially disjoint split.

    from spatia.evaluate import EvaluateConfig, evaluate, write_report
    results = evaluate(adata, EvaluateConfig(labels="cell_type"), crops=crops, imputer=decoder)
    write_report(results, "report_dir")

Heavy dependencies (scanpy, xgboost, umap, matplotlib) are imported inside the functions.
"""

from spatia.evaluate.baselines import (
    ExpressionKnnImputer,
    GeneMeanImputer,
    Imputer,
    KnnImputer,
    log_normalise,
    pca_embedding,
)
from spatia.evaluate.crops import CellCrops, align_crops, crops_from_mist, load_crops_npz
from spatia.evaluate.morphology import morphology_features
from spatia.evaluate.report import metrics_payload, render_markdown, write_report
from spatia.evaluate.splits import spatial_block_split, split_from_column
from spatia.evaluate.tasks import EvaluateConfig, add_modality_embedding, evaluate, hold_out_mask

__all__ = [
    "CellCrops",
    "EvaluateConfig",
    "ExpressionKnnImputer",
    "GeneMeanImputer",
    "Imputer",
    "KnnImputer",
    "add_modality_embedding",
    "align_crops",
    "crops_from_mist",
    "evaluate",
    "hold_out_mask",
    "load_crops_npz",
    "log_normalise",
    "metrics_payload",
    "morphology_features",
    "pca_embedding",
    "render_markdown",
    "spatial_block_split",
    "split_from_column",
    "write_report",
]
