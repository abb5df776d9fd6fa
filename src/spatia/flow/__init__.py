"""Spatially conditioned morphology generation (paper sections 4.3, 5.2, 6): a latent
autoencoder of cell crops and conditional contrastive flow matching from control to target
cells, conditioned on the frozen SPATIA embedding and a perturbation embedding.

    from spatia.flow import flow_train, flow_generate, flow_evaluate, flow_ablate, preset
    cfg = preset("demo")
    flow_train("mist/", "pairs/", "embeddings.h5ad", "flow/", cfg.train, seed=0)
    flow_generate("flow/", "gen/", cfg.generate)
    flow_evaluate("gen/", "report/", cfg.evaluate)

Stages, files and metrics are described in docs/flow.md. Names load on first use.
"""

from __future__ import annotations

from spatia.lazy import lazy_getattr

_LAZY = {
    "AutoencoderConfig": "spatia.flow.config",
    "FlowModelConfig": "spatia.flow.config",
    "FlowOptimConfig": "spatia.flow.config",
    "FlowTrainConfig": "spatia.flow.config",
    "FlowGenerateConfig": "spatia.flow.config",
    "FlowEvaluateConfig": "spatia.flow.config",
    "FlowAblateConfig": "spatia.flow.config",
    "CrossModalConfig": "spatia.flow.crossmodal",
    "PRESETS": "spatia.flow.config",
    "preset": "spatia.flow.config",
    "variant_train_config": "spatia.flow.config",
    "flow_train": "spatia.flow.train",
    "FlowTrainResult": "spatia.flow.train",
    "flow_generate": "spatia.flow.generate",
    "FlowGenerateResult": "spatia.flow.generate",
    "flow_evaluate": "spatia.flow.evaluate",
    "FlowEvaluateResult": "spatia.flow.evaluate",
    "flow_ablate": "spatia.flow.ablate",
    "FlowAblateResult": "spatia.flow.ablate",
    "flow_crossmodal": "spatia.flow.crossmodal",
    "niche_dependence": "spatia.flow.niche",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr("spatia.flow", _LAZY)
