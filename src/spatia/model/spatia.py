"""The SPATIA model: cell fusion, niche and tissue attention, final fusion, dual decoders.

The batch contract (keys, shapes, what each level reads) is `spatia.model.batch.MultiScaleBatch`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from spatia.errors import ConfigError, DatasetError, InputDataError
from spatia.keys import LEVELS
from spatia.model.config import SpatiaConfig, validate_config
from spatia.model.batch import LEVEL_KEYS, MultiScaleBatch, counts_key, image_key, measured_key
from spatia.model.decoders import GeneDecoder, ImageDecoder, gene_loss, image_loss
from spatia.model.dihedral import oriented
from spatia.model.fusion import CellFusion, FinalFusion
from spatia.model.gene import GeneEncoder, normalize_counts, read_gene_table, select_genes, split_masked
from spatia.model.image import ImageEncoder, load_vitmae_weights, random_patch_mask
from spatia.model.layers import init_weights, unpatchify
from spatia.model.morphometry import morphometry_measures, n_morphometry_features, standardise_over_batch
from spatia.model.niche import NicheAttention
from spatia.model.tissue import TissueTransformer

log = logging.getLogger(__name__)

MODALITIES = ("both", "image", "gene")


@dataclass
class LevelReconstruction:
    """Decoder outputs of one level (N = cells, niches or tissues).

    image: predicted pixels float32 (N, C, S, S) for every patch, in pixel units; patch_masked
    bool (N, P) (True = the patch was hidden from the encoder: the image loss targets);
    gene_mean float32 (N, G) the negative-binomial mean of every vocabulary gene (0 where
    unmeasured), gene_dispersion float32 (G,) its theta, gene_counts float32 (N, G) the raw
    counts it was scored against (0 where unmeasured), gene_measured bool (N, G) the targets.
    Absent parts are None (loss weight 0).
    """

    image: torch.Tensor | None = None
    patch_masked: torch.Tensor | None = None
    gene_mean: torch.Tensor | None = None
    gene_dispersion: torch.Tensor | None = None
    gene_counts: torch.Tensor | None = None
    gene_measured: torch.Tensor | None = None


@dataclass
class SpatiaOutput:
    """Embeddings (float32, width D = fusion.dim) and losses of one forward pass.

    Per cell (B, D): z (unified, Eq. 4), z_cell, z_niche (its niche's embedding), z_tissue (its
    niche's tissue-context embedding); z_niche / z_tissue are None when that level did not run.
    Per niche (Bn, D): niche_embeddings (Eq. 5), niche_tissue_embeddings (Eq. 6). Per tissue
    (Bt, D): tissue_embeddings (the summary the tissue decoders read). losses: scalar tensors
    keyed "cell/image", "cell/gene", "niche/image", ... and "total" (the weighted sum); empty
    when losses were not computed.
    """

    z: torch.Tensor
    z_cell: torch.Tensor
    z_niche: torch.Tensor | None = None
    z_tissue: torch.Tensor | None = None
    niche_embeddings: torch.Tensor | None = None
    niche_tissue_embeddings: torch.Tensor | None = None
    tissue_embeddings: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    reconstructions: dict[str, LevelReconstruction] = field(default_factory=dict)


EMBEDDING_FIELDS = ("z", "z_cell", "z_niche", "z_tissue", "niche_embeddings", "niche_tissue_embeddings",
                    "tissue_embeddings")


def mean_output(outputs: Sequence[SpatiaOutput]) -> SpatiaOutput:
    """The element-wise mean of the embeddings of several passes over the same batch (no losses)."""
    return SpatiaOutput(**{name: None if getattr(outputs[0], name) is None else
                           torch.stack([getattr(out, name) for out in outputs]).mean(dim=0)
                           for name in EMBEDDING_FIELDS})


def check_levels(levels: Sequence[str]) -> tuple[str, ...]:
    """Levels must be ("cell",), ("cell", "niche") or ("cell", "niche", "tissue") in any order."""
    chosen = tuple(level for level in LEVELS if level in levels)
    unknown = set(levels) - set(LEVELS)
    if unknown or chosen != LEVELS[: len(chosen)] or not chosen:
        raise ValueError(f"levels must be cell, cell+niche or cell+niche+tissue; got {tuple(levels)}")
    return chosen


class SpatiaModel(nn.Module):
    """SPATIA (sections 3-4, appendix B): multi-scale cell embeddings from images and genes.

    `SpatiaModel(config, gene_symbols)`: `gene_symbols` is the gene vocabulary (the dataset
    manifest's genes, in the order of the batch's count columns).
    """

    def __init__(self, config: SpatiaConfig, gene_symbols: Sequence[str]):
        super().__init__()
        validate_config(config, source=config.name)
        symbols = [str(s) for s in gene_symbols]
        if not symbols:
            raise InputDataError("the gene vocabulary is empty", fix="build the model from a dataset with genes")
        if len(set(symbols)) != len(symbols):
            raise InputDataError("the gene vocabulary has duplicate symbols",
                                 fix="give each gene one column in the dataset")
        self.config = config
        self.gene_symbols = symbols
        im, dim = config.image, config.fusion.dim
        self.cell_image_encoder = ImageEncoder(im, im.cell_size_px)
        self.niche_image_encoder = None if im.share_encoder else ImageEncoder(im, im.niche_size_px)
        self.tissue_image_encoder = None if im.share_encoder else ImageEncoder(im, im.tissue_size_px)
        self.gene_encoder = GeneEncoder(config.gene, len(symbols))
        self.cell_fusion = CellFusion(config.fusion, im.hidden_size, config.gene.dim, im.channels)
        self.niche_attention = NicheAttention(config.niche, dim, im.hidden_size)
        self.tissue_transformer = TissueTransformer(config.tissue, dim, im.hidden_size)
        self.final_fusion = FinalFusion(config.fusion)
        decoder = config.image_decoder
        self.image_decoders = nn.ModuleDict({
            "cell": ImageDecoder(decoder, dim, dim, im.patch_size, im.channels),
            "niche": ImageDecoder(decoder, dim, im.hidden_size, im.patch_size, im.channels),
            "tissue": ImageDecoder(decoder, dim, im.hidden_size, im.patch_size, im.channels),
        })
        self.gene_decoder = GeneDecoder(config.gene_decoder, dim, len(symbols))
        self.morphometry_head = (nn.Linear(im.hidden_size, n_morphometry_features(im.channels))
                                 if config.loss.cell.morphometry > 0 else None)
        self.apply(init_weights)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters") and not isinstance(
                    module, (nn.Linear, nn.LayerNorm, nn.Embedding)):
                module.reset_parameters()

    # ----------------------------------------------------------------------------------------
    # structure
    # ----------------------------------------------------------------------------------------

    @property
    def embedding_dim(self) -> int:
        return self.config.fusion.dim

    def image_encoder(self, level: str) -> ImageEncoder:
        """The ViT that encodes `level`'s images (the cell encoder when shared)."""
        encoder = {"cell": self.cell_image_encoder, "niche": self.niche_image_encoder,
                   "tissue": self.tissue_image_encoder}[level]
        return encoder if encoder is not None else self.cell_image_encoder

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by stage, for cell -> niche -> tissue -> joint training.

        "cell": cell image encoder, gene encoder, cell fusion, cell image decoder;
        "niche": niche image encoder (unless shared), Eq. 5 attention, niche image decoder;
        "tissue": tissue image encoder (unless shared), Eq. 6 transformer, tissue image decoder;
        "shared": final fusion (Eq. 4) and the gene decoder, used by every level.
        Every parameter is in exactly one group.
        """
        groups = {
            "cell": [self.cell_image_encoder, self.gene_encoder, self.cell_fusion, self.image_decoders["cell"],
                     self.morphometry_head],
            "niche": [self.niche_image_encoder, self.niche_attention, self.image_decoders["niche"]],
            "tissue": [self.tissue_image_encoder, self.tissue_transformer, self.image_decoders["tissue"]],
            "shared": [self.final_fusion, self.gene_decoder],
        }
        return {name: [p for m in modules if m is not None for p in m.parameters()]
                for name, modules in groups.items()}

    def count_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ----------------------------------------------------------------------------------------
    # pretrained inputs (local paths only)
    # ----------------------------------------------------------------------------------------

    def load_pretrained(self, *, image_weights: str | Path | None = None,
                        gene_embeddings: str | Path | None = None) -> dict:
        """Load a ViTMAE directory into every image encoder and/or a gene-vector table into the
        gene-ID embeddings. Returns a report dict (what was loaded, genes found/missing)."""
        report: dict = {}
        if image_weights is not None:
            encoders = [self.cell_image_encoder, self.niche_image_encoder, self.tissue_image_encoder]
            for encoder in encoders:
                if encoder is not None:
                    report["image_weights"] = load_vitmae_weights(encoder, image_weights, self.config.image)
        if gene_embeddings is not None:
            symbols, vectors = read_gene_table(gene_embeddings)
            report["gene_embeddings"] = self.gene_encoder.load_gene_vectors(
                self.gene_symbols, symbols, vectors, source=gene_embeddings)
        if report:
            log.info("pretrained inputs loaded: %s", report)
        return report

    # ----------------------------------------------------------------------------------------
    # forward
    # ----------------------------------------------------------------------------------------

    def check_batch(self, batch: MultiScaleBatch, levels: Sequence[str]) -> None:
        """Check the keys and shapes the given levels read; raise a `SpatiaError` on a mismatch."""
        cfg = self.config.image
        n_genes = len(self.gene_symbols)
        sizes = {"cell": cfg.cell_size_px, "niche": cfg.niche_size_px, "tissue": cfg.tissue_size_px}
        for level in levels:
            missing = [k for k in LEVEL_KEYS[level] if k not in batch]
            if missing:
                raise DatasetError(f"the batch lacks {', '.join(missing)} needed by the {level} level",
                                   fix="use a MIST dataset built with niche and tissue levels, or fewer levels")
            image = batch[f"{level}_image"]
            if image.ndim != 4 or image.shape[1] != cfg.channels or image.shape[2] != sizes[level] \
                    or image.shape[3] != sizes[level]:
                raise ConfigError(
                    f"{level} images have shape {tuple(image.shape)}, the config expects "
                    f"(N, {cfg.channels}, {sizes[level]}, {sizes[level]})",
                    path=self.config.name,
                    fix=f"use a config whose image.{level}_size_px matches the dataset, or rebuild the dataset",
                )
            for key in (f"{level}_counts", f"{level}_gene_measured"):
                shape = tuple(batch[key].shape)
                if shape != (image.shape[0], n_genes):
                    raise DatasetError(
                        f"{key} has shape {shape}, expected ({image.shape[0]}, {n_genes}) for the "
                        f"model's {n_genes}-gene vocabulary",
                        fix="use the model with the dataset whose gene vocabulary it was built for")
        if "niche" in levels:
            self._check_index(batch["cell_niche_index"], batch["niche_image"].shape[0], "cell_niche_index")
        if "tissue" in levels:
            slots = self.config.tissue.grid_size ** 2
            index = batch["tissue_niche_index"]
            if tuple(index.shape) != (batch["tissue_image"].shape[0], slots):
                raise ConfigError(
                    f"tissue_niche_index has shape {tuple(index.shape)}, expected (Bt, {slots})",
                    path=self.config.name, fix="set tissue.grid_size to the dataset's niches per tissue side")
            n_niches = batch["niche_image"].shape[0]
            self._check_index(batch["niche_tissue_index"], batch["tissue_image"].shape[0], "niche_tissue_index")
            if index.numel() and int(index.max()) >= n_niches:
                raise DatasetError(f"tissue_niche_index points past the {n_niches} niches of the batch")

    @staticmethod
    def _check_index(index: torch.Tensor, size: int, name: str) -> None:
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
            raise DatasetError(f"{name} holds rows outside [0, {size})",
                               fix="every cell / niche must point at a niche / tissue of the same batch")

    def forward(self, batch: MultiScaleBatch, *, mask_image: bool = True, mask_genes: bool = True,
                modality: str = "both", levels: Sequence[str] = LEVELS, compute_losses: bool = True,
                generator: torch.Generator | None = None, reuse: dict | None = None) -> SpatiaOutput:
        """Embed a batch and (by default) compute the self-supervised losses.

        mask_image: MAE masking of `image.mask_ratio` of the patches at every level.
        mask_genes: masked gene modelling (`gene.mask_ratio` of the selected gene tokens, and
            every token of a `gene.withhold_ratio` share of the cells, are left out of the
            encoder) and random gene-token sampling; without it the gene tokens are chosen
            deterministically. The gene losses always score the whole measured panel.
        modality: "both"; "image" withholds genes (no gene token enters; the gene losses still
            score the whole measured panel); "gene" withholds images (every patch at every level is masked: encoders
            see only their CLS token; every patch is a target).
        levels: ("cell",), ("cell", "niche") or ("cell", "niche", "tissue") - the stage.
        generator: the source of every random draw (masks, gene sampling), for reproducibility.
        reuse: a dict kept across passes over the same batch that differ only in the cell crops'
            orientation (`embed`): the gene tokens, the crops' morphometry measures (the same in
            every orientation) and the niche and tissue images are computed in the first pass
            and read back in the others. Only for passes without masking.
        """
        levels = check_levels(levels)
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, not {modality!r}")
        self.check_batch(batch, levels)
        cfg = self.config
        use_image, use_genes = modality != "gene", modality != "image"
        image_ratio = (cfg.image.mask_ratio if mask_image else 0.0) if use_image else 1.0
        gene_ratio = (cfg.gene.mask_ratio if mask_genes else 0.0) if use_genes else 1.0

        if reuse is not None and (mask_image or mask_genes):
            raise ValueError("reuse is for passes without masking (embed)")

        def reused(key: str, compute):
            if reuse is None:
                return compute()
            if key not in reuse:
                reuse[key] = compute()
            return reuse[key]

        # ---- cell level: image tokens (queries) x gene tokens (keys/values)
        cell = self._encode_images("cell", batch["cell_image"], image_ratio, generator)

        def encode_genes():
            measured = batch["cell_gene_measured"].bool()
            values = normalize_counts(batch["cell_counts"], measured, cfg.gene.library_target())
            selection = select_genes(values, measured, cfg.gene.max_tokens, randomize=mask_genes,
                                     zero_priority=self.gene_encoder.zero_priority, generator=generator)
            withhold = None
            if mask_genes and use_genes and cfg.gene.withhold_ratio > 0:
                draw = torch.rand(values.shape[0], device=values.device, generator=generator)
                withhold = draw < cfg.gene.withhold_ratio
            kept, _ = split_masked(selection, gene_ratio, withhold=withhold, generator=generator)
            return self.gene_encoder(kept.index, kept.take(values), kept.valid)

        genes = reused("genes", encode_genes)
        gene_tokens, gene_valid = genes.tokens, genes.valid
        # the profile embedding before attention (validated: gene.profile_token), 0 without genes
        summary = genes.profile if cfg.fusion.gene_residual else None
        # the crop's measures feed the morphometry input and/or are the morphometry target
        morphometry_loss = compute_losses and self.morphometry_head is not None and use_image and "cell_mask" in batch
        measures = None
        if use_image and (cfg.fusion.morphometry_residual or morphometry_loss):
            measures = reused("measures", lambda: self._cell_measures(batch))  # the same in every orientation
        fused, z_cell = self.cell_fusion(cell["tokens"], gene_tokens, gene_valid, summary,
                                         measures if cfg.fusion.morphometry_residual else None)

        # ---- niche level (Eq. 5) and tissue level (Eq. 6)
        z_niche = z_tissue = niche_z = niche_tz = tissue_z = None
        niche = tissue = None
        if "niche" in levels:
            cell_niche = batch["cell_niche_index"]
            niche = reused("niche", lambda: self._encode_images("niche", batch["niche_image"], image_ratio, generator))
            niche_z, _ = self.niche_attention(z_cell, cell_niche, niche["tokens"])
            z_niche = niche_z[cell_niche]
        if "tissue" in levels:
            tissue = reused("tissue", lambda: self._encode_images("tissue", batch["tissue_image"], image_ratio,
                                                                  generator))
            niche_tz, tissue_z = self.tissue_transformer(
                niche_z, batch["tissue_niche_index"], batch["niche_tissue_index"], tissue["tokens"])
            z_tissue = niche_tz[batch["cell_niche_index"]]

        # ---- final fusion (Eq. 4)
        z = self.final_fusion(z_cell, z_niche, z_tissue)
        out = SpatiaOutput(z=z, z_cell=z_cell, z_niche=z_niche, z_tissue=z_tissue, niche_embeddings=niche_z,
                           niche_tissue_embeddings=niche_tz, tissue_embeddings=tissue_z)
        if not compute_losses:
            return out

        # ---- dual decoders, per level
        total = z.new_zeros(())
        pixel_mean, pixel_std = cfg.image.pixel_stats()
        norm_pix = cfg.image_decoder.norm_pix_loss
        level_inputs = {"cell": (z, fused[:, 1:], cell)}
        if niche is not None:
            level_inputs["niche"] = (niche_z, niche["tokens"][:, 1:], niche)
        if tissue is not None:
            level_inputs["tissue"] = (tissue_z, tissue["tokens"][:, 1:], tissue)
        for level, (emb, visible, enc) in level_inputs.items():
            weights = getattr(cfg.loss, level)
            rec = LevelReconstruction()
            if weights.image > 0:
                images = batch[image_key(level)]
                pred = self.image_decoders[level](emb, visible, enc["keep"], enc["masked"].shape[1])
                loss = image_loss(pred, images, enc["masked"], cfg.image.patch_size, norm_pix, pixel_mean, pixel_std)
                out.losses[f"{level}/image"] = loss
                total = total + weights.image * loss
                pixels = unpatchify(pred, cfg.image.patch_size, cfg.image.channels)
                rec.image = pixels if norm_pix else pixels * pixel_std + pixel_mean
                rec.patch_masked = enc["masked"]
            if weights.gene > 0:
                counts, level_measured = batch[counts_key(level)], batch[measured_key(level)].bool()
                theta = self.gene_decoder.dispersion(level)
                loss, mean = gene_loss(self.gene_decoder(emb, level), theta, counts, level_measured)
                out.losses[f"{level}/gene"] = loss
                total = total + weights.gene * loss
                rec.gene_mean, rec.gene_dispersion, rec.gene_measured = mean, theta, level_measured
                rec.gene_counts = torch.where(level_measured, counts.float(), torch.zeros((), device=counts.device))
            out.reconstructions[level] = rec
        if morphometry_loss:
            # MaskFeat-style: the crop's hand-made measures from the visible patches' tokens
            target = standardise_over_batch(measures)
            pred = self.morphometry_head(cell["tokens"].mean(dim=1)).float()
            loss = torch.nn.functional.mse_loss(pred, target)
            out.losses["cell/morphometry"] = loss
            total = total + cfg.loss.cell.morphometry * loss
        out.losses["total"] = total
        return out

    @staticmethod
    def _cell_measures(batch: MultiScaleBatch) -> torch.Tensor:
        """The cell crops' morphometry measures (B, F); without `cell_mask`, of the whole crop."""
        mask = batch.get("cell_mask")
        if mask is None:
            image = batch["cell_image"]
            mask = torch.zeros(image.shape[0], 1, *image.shape[2:], dtype=torch.bool, device=image.device)
        return morphometry_measures(batch["cell_image"], mask)

    def _encode_images(self, level: str, images: torch.Tensor, mask_ratio: float,
                       generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        n_patches = (images.shape[-1] // self.config.image.patch_size) ** 2
        keep, masked = random_patch_mask(images.shape[0], n_patches, mask_ratio, device=images.device,
                                         generator=generator)
        tokens = self.image_encoder(level)(images, keep if bool(masked.any()) else None)
        return {"tokens": tokens, "keep": keep, "masked": masked}

    @torch.no_grad()
    def embed(self, batch: MultiScaleBatch, modality: str = "both",
              levels: Sequence[str] = LEVELS) -> SpatiaOutput:
        """Embeddings without masking, dropout or losses (deterministic gene-token choice).

        With `image.embed_orientations` 8 (and images used) every output is the mean over the
        eight orientations of the cell crop (`spatia.model.dihedral`); niche and tissue images
        keep theirs.

        The module is put in eval mode for the call and restored afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            views = self.config.image.embed_orientations if modality != "gene" else 1
            reuse: dict = {}  # genes, niche and tissue images: encoded once for every orientation
            outs = [self.forward(oriented(batch, code), mask_image=False, mask_genes=False, modality=modality,
                                 levels=levels, compute_losses=False, reuse=reuse) for code in range(views)]
        finally:
            self.train(was_training)
        return outs[0] if len(outs) == 1 else mean_output(outs)

