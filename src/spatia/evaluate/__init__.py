"""Downstream evaluation: SPATIA embeddings against baselines, one spatially disjoint split.

    from spatia.evaluate import EvaluateConfig, evaluate, write_report
    results = evaluate(adata, EvaluateConfig(labels=("cell_type", "domain")), crops=crops, imputer=decoder)
    write_report(results, "report_dir")

Modules by job: `config` (EvaluateConfig), `inputs` (labels, split, embeddings, baselines),
`tasks/` (annotation, clustering, expression, patches, imputation), `leiden`, `layout`,
`baselines` (feature scaling, imputers), `autoencoder` and `scvi_latent` (learned baselines),
`morphology` (hand-made features), `crops`, `splits`, `run` (`evaluate`), `report`.
Heavy dependencies (scanpy, xgboost, umap, matplotlib, scvi-tools) are imported inside the
functions.
"""

from spatia.evaluate.baselines import ExpressionKnnImputer, GeneMeanImputer, Imputer, KnnImputer
from spatia.evaluate.config import EvaluateConfig
from spatia.evaluate.crops import (
    CellCrops,
    NicheCrops,
    align_crops,
    crops_from_mist,
    load_crops_npz,
    niche_crops_from_mist,
)
from spatia.evaluate.inputs import add_image_only_embeddings, add_modality_embedding, embedded_cells
from spatia.evaluate.morphology import morphology_features
from spatia.evaluate.report import metrics_payload, render_markdown, write_report
from spatia.evaluate.run import evaluate
from spatia.evaluate.splits import spatial_block_split, split_from_column
from spatia.evaluate.tasks import hold_out_mask

__all__ = [
    "CellCrops",
    "EvaluateConfig",
    "ExpressionKnnImputer",
    "GeneMeanImputer",
    "Imputer",
    "KnnImputer",
    "NicheCrops",
    "add_image_only_embeddings",
    "add_modality_embedding",
    "align_crops",
    "crops_from_mist",
    "embedded_cells",
    "evaluate",
    "hold_out_mask",
    "load_crops_npz",
    "metrics_payload",
    "morphology_features",
    "niche_crops_from_mist",
    "render_markdown",
    "spatial_block_split",
    "split_from_column",
    "write_report",
]
