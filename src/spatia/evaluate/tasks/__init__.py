"""The evaluation tasks, one module each; `spatia.evaluate.run.evaluate` runs them together.

- `annotation`: MLP and logistic regression classifiers per representation;
- `clustering`: Leiden (several resolutions) and KMeans against each label column;
- `expression`: expression of HVGs from image-only inputs, per cell (XGBoost, ridge);
- `patches`: pooled expression of each niche from its image-only inputs (paper Fig. 5);
- `imputation`: held-out genes predicted by the model's gene decoder and by baselines.
"""

from spatia.evaluate.tasks.annotation import annotation_task
from spatia.evaluate.tasks.clustering import clustering_task
from spatia.evaluate.tasks.expression import expression_task, select_hvgs
from spatia.evaluate.tasks.imputation import hold_out_mask, imputation_task
from spatia.evaluate.tasks.patches import niche_image_features, patch_expression_task

__all__ = [
    "annotation_task",
    "clustering_task",
    "expression_task",
    "hold_out_mask",
    "imputation_task",
    "niche_image_features",
    "patch_expression_task",
    "select_hvgs",
]
