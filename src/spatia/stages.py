"""The pipeline's stages as library functions: the CLI and `spatia demo` call these, nothing else.

Every stage has the same shape:

    result = stage(inputs..., out, config, *, seed=0) -> StageResult

- inputs are paths (or AnnData where a stage reads one); `out` is the output path, which must
  not exist (outputs are written under a temporary name and renamed when complete);
- `config` is one typed dataclass, built by `spatia.config.load_config` from its defaults, a
  YAML/JSON file and CLI options; its resolved value is saved in the run record;
- the stage reads its inputs, calls the package that does the work, writes its outputs and
  its run record (`spatia_run.json`: command, inputs, seed, config, versions) through
  `spatia.outputs.write_run_record`, and returns a `StageResult` whose `summary()` holds the
  headline figures the CLI prints and the demo collects.

| stage      | inputs                          | output                  | package doing the work |
|------------|---------------------------------|-------------------------|------------------------|
| simulate   | -                               | Xenium-like bundle dir  | spatia.sim             |
| build      | Xenium bundle dirs              | MIST dataset dir        | spatia.mist            |
| pretrain   | MIST dataset                    | run dir (checkpoints)   | spatia.train           |
| embed      | MIST dataset + checkpoint       | .h5ad                   | spatia.train           |
| evaluate   | .h5ad (+ dataset, checkpoint)   | report dir              | spatia.evaluate        |
| pair       | .h5ad + transitions             | pairs dir               | spatia.perturb         |
| flow_*     | dataset + pairs + embeddings    | flow / generation dirs  | spatia.flow            |

Heavy packages (torch, Lightning, scanpy) are imported inside the functions, so importing this
module is cheap.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from spatia.errors import ConfigError, InputDataError
from spatia.keys import (
    EMBEDDED_FLAG,
    EMBEDDING_KEY_OF_MODALITY,
    RUN_RECORD_NAME,
    SKIP_REASON,
    X_SPATIA_GENE,
)
from spatia.outputs import refuse_existing, write_run_record

if TYPE_CHECKING:
    from spatia.evaluate import EvaluateConfig
    from spatia.mist import BuildConfig
    from spatia.perturb import PairingConfig
    from spatia.sim import SimulationConfig


@dataclass
class StageResult:
    """What a stage wrote: its main output path, headline figures, and the package's own result."""

    stage: str
    path: Path | None
    figures: dict[str, Any] = field(default_factory=dict)
    detail: Any = None  # the package's result object (SimulationResult, BuildSummary, ...)

    def summary(self) -> dict[str, Any]:
        """Headline figures as plain data (JSON-ready): what the CLI prints, what the demo keeps."""
        return {"stage": self.stage, "path": None if self.path is None else str(self.path), **self.figures}


def _path_or_none(path: str | Path | None) -> str | None:
    """An input path as recorded in the run record: absolute, or None."""
    return None if path is None else str(Path(path).resolve())


# --- simulate ----------------------------------------------------------------------------------


def simulate(out: str | Path, config: SimulationConfig | None = None, *, seed: int = 0) -> StageResult:
    """Simulate a tissue section with known ground truth and write it as a Xenium bundle."""
    from spatia.sim import SimulationConfig, simulate_bundle

    result = simulate_bundle(out, config if config is not None else SimulationConfig(), seed=seed)
    return StageResult("simulate", result.path, {
        "cells": result.n_cells, "genes": result.n_genes, "image_px": [result.width_px, result.height_px],
        "layout": result.layout, "z_planes": result.z_planes,
    }, result)


# --- build -------------------------------------------------------------------------------------


def build(bundles: list[str | Path] | tuple[str | Path, ...], out: str | Path, config: BuildConfig | None = None,
          *, seed: int = 0, workers: int = 0) -> StageResult:
    """Build a MIST dataset (cells, niches, tissue regions) from Xenium bundles; resumable."""
    from spatia.mist import BuildConfig, build_dataset

    if workers < 0:
        raise ConfigError(f"workers = {workers} is negative", fix="use 0 (in this process) or a positive number")
    summary = build_dataset(list(bundles), out, config if config is not None else BuildConfig.cpu(), seed=seed,
                            workers=workers)
    return StageResult("build", summary.path, {
        "slides": summary.n_slides, "genes": summary.n_genes, "cells": summary.n_cells, "niches": summary.n_niches,
        "tissues": summary.n_tissues, "skipped": {k: v for k, v in summary.skipped.items() if v},
        "repaired": {k: v for k, v in summary.repaired.items() if v}, "clipped": summary.n_clipped,
        "splits": summary.splits.get("cell", {}), "chunks_rendered": summary.chunks_rendered,
        "chunks_resumed": summary.chunks_resumed, "seconds": round(summary.seconds, 2),
        "cells_per_second": round(summary.cells_per_second, 1),
    }, summary)


# --- pretrain ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run: which model config, which stage, where it starts, on what devices.

    model: packaged config name (tiny, base) or a YAML file; None = tiny, or the checkpoint's.
    model_overrides: dotted keys of the model config applied on top, e.g. {"train.lr": 1e-4}
        (what `spatia pretrain --lr` and friends set).
    """

    model: str | None = None
    stage: Literal["cell", "niche", "tissue", "joint"] | None = None
    init_from: Path | None = None
    resume: Path | None = None
    image_weights: Path | None = None
    gene_embeddings: Path | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    devices: str = "1"
    num_nodes: int = 1
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    threads: int | None = None
    progress_bar: bool = True

    def validate(self) -> None:
        parse_devices(self.devices)
        if self.num_nodes < 1:
            raise ConfigError(f"'num_nodes' must be at least 1, not {self.num_nodes}", fix="set it to 1 or more")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"'threads' must be at least 1, not {self.threads}", fix="set it to 1 or more")


def parse_devices(text: str | int) -> int | str:
    """Lightning's devices value from an option: a positive count, -1 (all) or auto."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value == 0 or value < -1:
        raise ConfigError(f"devices {text!r} is not a device count", fix="use a positive number, -1 (all) or auto")
    return value


def pretrain(dataset: str | Path, out: str | Path, config: PretrainConfig = PretrainConfig(), *, seed: int = 0,
             callbacks: list | None = None) -> StageResult:
    """Pretrain one SPATIA stage on a MIST dataset: checkpoints, config, logs and run record in `out`.

    A run that fails before its first checkpoint removes the run directory it created (there is
    nothing to resume); a later failure keeps it, for `--resume`.
    """
    from spatia.train import pretrain as train_stage
    from spatia.train.pretrain import env_rank_is_zero

    train_keys = {key.removeprefix("train."): value for key, value in config.model_overrides.items()
                  if key.startswith("train.") and value is not None}
    others = sorted(key for key in config.model_overrides if not key.startswith("train."))
    if others:
        raise ConfigError(f"model overrides outside 'train' are not supported here: {others}",
                          fix="put model sizes in a YAML config file and pass it as the model config")
    out = Path(out)
    created = not out.exists()
    try:
        result = train_stage(
            dataset, out, config=config.model, stage=config.stage, init_from=config.init_from, resume=config.resume,
            image_weights=config.image_weights, gene_embeddings=config.gene_embeddings, train_overrides=train_keys,
            devices=parse_devices(config.devices), num_nodes=config.num_nodes, accelerator=config.accelerator,
            start_method="popen", threads=config.threads, seed=seed, progress_bar=config.progress_bar,
            callbacks=callbacks,
        )
    except BaseException:
        if created and config.resume is None and env_rank_is_zero() and not any(out.glob("checkpoints/*.ckpt")):
            shutil.rmtree(out, ignore_errors=True)
        raise
    return StageResult("pretrain", result.out_dir, {
        "training_stage": result.stage, "steps": result.global_step, "checkpoint": str(result.last_checkpoint),
        "final_losses": {k: round(float(v), 4) for k, v in result.metrics.items()},
    }, result)


# --- embed -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedConfig:
    """How to embed: which modalities the model sees, which cells, on what devices."""

    modality: Literal["both", "image", "gene"] = "both"
    splits: tuple[str, ...] = ()  # empty: every cell
    batch_cells: int = 512
    devices: str = "1"
    num_nodes: int = 1
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    precision: str = "auto"
    workers: int = 0
    threads: int | None = None
    progress_bar: bool = True
    # orientations of each cell crop the embedding averages over: 1 or 8; null: the checkpoint's
    # image.embed_orientations (8 by default; docs/model.md)
    orientations: int | None = None

    def validate(self) -> None:
        from spatia.model.config import EMBED_ORIENTATION_CHOICES  # imports torch: not at the CLI's start

        parse_devices(self.devices)
        if self.orientations is not None and self.orientations not in EMBED_ORIENTATION_CHOICES:
            raise ConfigError(f"'orientations' must be one of {EMBED_ORIENTATION_CHOICES} or null, not "
                              f"{self.orientations}", fix="use 8 (every orientation of the crop), 1 (as is) or null")
        if self.batch_cells < 1:
            raise ConfigError(f"'batch_cells' must be at least 1, not {self.batch_cells}", fix="use e.g. 512")
        if self.workers < 0:
            raise ConfigError(f"'workers' must be 0 or more, not {self.workers}", fix="use 0 (in this process)")


GENE_ONLY_HINT_WEIGHT = 0.09
"""Below this measured `fusion.morphometry_weight` (the crop measures explain under 3 % of the
expression: (0.03 / 0.1) ** 2), `embed` of both modalities suggests the gene-only embedding as
well. Measured: on bone-marrow region1 (weight 0.001-0.02, 8-bit-derived DAPI) the gene-only
embedding of the same checkpoint scored +0.003 MLP macro-F1 and +0.005 Leiden ARI above
`X_spatia` on the mean of four splits (above on three and two of them; +0.015 and +0.015 with the
linear weight 0.04-0.14, +0.024 and +0.09 before the cell fusion's gene query; docs/results.md),
so on such a section the two are worth comparing. Above it: the simulator (1), where the images
carry the domain (gene-only 0.79 vs `X_spatia` 0.88-0.91), and breast (0.18-1), where they
carry the nuclei's morphology, though its expression-derived labels still favour the gene-only
view (docs/results.md)."""


def gene_only_hint(morphometry_weight: float | None) -> str | None:
    """The note `spatia embed` prints when the checkpoint's images carry little of the section's
    expression (`GENE_ONLY_HINT_WEIGHT`); None otherwise or when the weight was not measured."""
    if morphometry_weight is None or morphometry_weight >= GENE_ONLY_HINT_WEIGHT:
        return None
    return (f"this checkpoint measured that the cell images explain little of the expression "
            f"(fusion.morphometry_weight {morphometry_weight:.3g} < {GENE_ONLY_HINT_WEIGHT}): also embed with "
            "--modality gene and pass it to `spatia evaluate --gene-embeddings`; on such a section (bone-marrow "
            "region1) the gene-only embedding read expression clusters better than X_spatia (docs/results.md)")


def embed(dataset: str | Path, checkpoint: str | Path, out: str | Path, config: EmbedConfig = EmbedConfig(), *,
          seed: int = 0) -> StageResult:
    """Embed every cell of a MIST dataset into an AnnData; the run record is OUT_STEM.spatia_run.json.

    Figures: cells, obsm keys, seconds, speed, the checkpoint's `morphometry_weight`; "note" when
    the build skipped cells, "hint" (`gene_only_hint`) for both modalities on a section whose
    images carry little."""
    from spatia.train import embed_dataset
    from spatia.train.pretrain import env_rank_is_zero

    out = Path(out)
    record_path = out.with_name(f"{out.stem}.{RUN_RECORD_NAME}")
    if env_rank_is_zero():
        refuse_existing(out, what="embedding file")
        refuse_existing(record_path, what="run record")
    result = embed_dataset(
        dataset, checkpoint, out, modality=config.modality, splits=list(config.splits) or None,
        batch_cells=config.batch_cells, devices=parse_devices(config.devices), num_nodes=config.num_nodes,
        accelerator=config.accelerator, precision=config.precision, start_method="popen",
        num_workers=config.workers, threads=config.threads, progress_bar=config.progress_bar,
        orientations=config.orientations,
    )
    figures = {"cells": result.n_cells, "obsm": list(result.obsm_keys), "seconds": round(result.seconds, 2),
               "cells_per_second": round(result.cells_per_second, 1),
               "embedding_key": EMBEDDING_KEY_OF_MODALITY[config.modality],
               "morphometry_weight": result.morphometry_weight}
    hint = gene_only_hint(result.morphometry_weight) if config.modality == "both" else None
    if hint is not None:
        figures["hint"] = hint
    if result.adata is not None and EMBEDDED_FLAG in result.adata.obs:
        embedded = result.adata.obs[EMBEDDED_FLAG].to_numpy(dtype=bool)
        if not embedded.all():  # kept as rows with NaN embeddings, which scanpy's neighbours refuse
            figures["skipped_cells"] = int((~embedded).sum())
            figures["note"] = (f"{int((~embedded).sum())} cells the build skipped are rows with NaN embeddings "
                               f"(obs['{EMBEDDED_FLAG}'] False, reason in obs['{SKIP_REASON}']); for scanpy use "
                               f"adata[adata.obs['{EMBEDDED_FLAG}']].copy()")
    if result.path is None:  # another DDP rank: the first one writes
        return StageResult("embed", None, figures, result)
    write_run_record(out.parent, "embed", config, seed, name=record_path.name, results=figures,
                     inputs={"dataset": _path_or_none(dataset), "checkpoint": _path_or_none(checkpoint)})
    return StageResult("embed", out, figures, result)


# --- evaluate ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluateInputs:
    """Optional inputs of the evaluation beside the embeddings AnnData.

    mist: the MIST dataset the embeddings came from: its cell crops feed the morphology
        baseline, and with `checkpoint` the gene-decoder imputer reads its images and context.
    checkpoint: a `spatia pretrain` checkpoint whose gene decoder imputes held-out genes.
    crops: an .npz with images, masks, cell_id for the morphology baseline (instead of `mist`).
    image_embeddings / gene_embeddings: .h5ad files of `spatia embed --modality image/gene`.
    device: where the imputer runs (cpu, cuda or auto).
    """

    mist: Path | None = None
    checkpoint: Path | None = None
    crops: Path | None = None
    image_embeddings: Path | None = None
    gene_embeddings: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def validate(self) -> None:
        if self.checkpoint is not None and self.mist is None:
            raise ConfigError("a checkpoint was given without the MIST dataset",
                              fix="also give the MIST dataset the embeddings came from (--mist): "
                                  "the imputer reads its images and context")
        if self.mist is not None and self.crops is not None and self.checkpoint is None:
            raise ConfigError("both a MIST dataset and a crops file were given", fix="give one source of crops")


@contextmanager
def naming_the_file(path: str | Path) -> Iterator[None]:
    """An `InputDataError` about an AnnData's contents (a missing obs column, no counts) that names
    no file gets the AnnData's path, so the message says which file to fix."""
    try:
        yield
    except InputDataError as error:
        if error.path is not None:
            raise
        raise InputDataError(error.problem, path=path, fix=error.fix) from None


def read_anndata(path: str | Path, *, what: str = "AnnData file"):
    """Read an .h5ad, turning a missing or unreadable file into a clear `InputDataError`."""
    import anndata

    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"the {what} does not exist", path=path, fix="give the path of an .h5ad file")
    try:
        return anndata.read_h5ad(path)
    except Exception as error:  # noqa: BLE001 - h5py/anndata raise many types for a bad file
        raise InputDataError(f"cannot read the {what} ({error})", path=path,
                             fix="give an .h5ad file written by anndata") from None


def evaluate(cells: str | Path, out: str | Path, config: EvaluateConfig,
             inputs: EvaluateInputs = EvaluateInputs(), *, seed: int | None = None) -> StageResult:
    """Score the embeddings in `cells` and the baselines; write metrics.json, report.md/html to `out`."""
    from spatia.evaluate import (
        add_image_only_embeddings,
        add_modality_embedding,
        crops_from_mist,
        load_crops_npz,
        niche_crops_from_mist,
        write_report,
    )
    from spatia.evaluate import evaluate as score

    out = Path(out)
    refuse_existing(out, what="report directory")
    inputs.validate()
    if seed is not None:
        config = replace(config, seed=seed)
    adata = read_anndata(cells)
    if inputs.image_embeddings is not None:
        image = read_anndata(inputs.image_embeddings, what="image-only embedding file")
        add_image_only_embeddings(adata, image, source=inputs.image_embeddings)
    if inputs.gene_embeddings is not None:
        add_modality_embedding(adata, read_anndata(inputs.gene_embeddings, what="gene-only embedding file"),
                               X_SPATIA_GENE, source=inputs.gene_embeddings)
    cell_crops = niche_crops = None
    if inputs.crops is not None:
        cell_crops = load_crops_npz(inputs.crops)
    elif inputs.mist is not None:
        cell_crops = crops_from_mist(inputs.mist, adata.obs_names.to_numpy().astype(str))
    if inputs.mist is not None and "patch_expression" in config.tasks:
        niche_crops = niche_crops_from_mist(inputs.mist)
    imputer = None
    if inputs.checkpoint is not None and "imputation" in config.tasks:
        import torch

        from spatia.train.impute import GeneDecoderImputer

        device = ("cuda" if torch.cuda.is_available() else "cpu") if inputs.device == "auto" else inputs.device
        imputer = GeneDecoderImputer.from_checkpoint(inputs.checkpoint, inputs.mist, adata.var_names, device=device,
                                                     decoder_weight=config.impute_decoder_weight)
    with naming_the_file(cells):
        results = score(adata, config, crops=cell_crops, imputer=imputer, niche_crops=niche_crops)
    write_report(results, out)
    from spatia.evaluate.verdicts import headline, task_verdicts

    verdicts = [headline(v) for v in task_verdicts(results).values()]
    figures = {"headlines": [text for text, _ in verdicts], "warnings": [w for _, w in verdicts if w],
               "annotation_macro_f1": annotation_headline(results), "imputation_pearson": imputation_headline(results)}
    write_run_record(out, "evaluate", config, config.seed, results=figures, inputs={
        "cells": _path_or_none(cells), **{name: _path_or_none(getattr(inputs, name)) for name in
                                          ("mist", "checkpoint", "crops", "image_embeddings", "gene_embeddings")},
    })
    return StageResult("evaluate", out, figures, results)


def annotation_headline(results: dict[str, Any]) -> dict[str, float]:
    """Mean MLP macro-F1 of the cell annotation per representation (the report has every metric)."""
    per_representation = results["tasks"].get("annotation", {}).get("results", {})
    return {name: round(scores["mlp"]["macro_f1"]["mean"], 3)
            for name, scores in per_representation.items() if isinstance(scores, dict) and "mlp" in scores}


def imputation_headline(results: dict[str, Any]) -> dict[str, float]:
    """Mean pooled Pearson on held-out genes per imputer (the gene decoder is "model")."""
    per_imputer = results["tasks"].get("imputation", {}).get("results", {})
    return {name: round(scores["pearson"]["mean"], 3) for name, scores in per_imputer.items()
            if isinstance(scores, dict) and scores.get("status") == "ok"}


# --- pair --------------------------------------------------------------------------------------


def pair(cells: str | Path, out: str | Path, config: PairingConfig, *, transitions: str | Path,
         annotations: str | Path | None = None, seed: int | None = None) -> StageResult:
    """Pair control and target cells of each transition by entropic OT; pairs and signatures in `out`.

    transitions: a transitions YAML file, or the name of a shipped example (simulated, breast_cancer).
    config: column settings (state_key, lineage_key, niche_key, ...) left at their defaults take
        the transitions file's.
    """
    from spatia.perturb import add_annotations, example_transitions_path, load_transitions, pair_cells, write_pairing
    from spatia.perturb.transitions import EXAMPLES

    out = Path(out)
    refuse_existing(out, what="output folder")
    transitions_path = Path(transitions)
    if not transitions_path.exists() and str(transitions) in EXAMPLES:
        transitions_path = example_transitions_path(str(transitions))
    spec = load_transitions(transitions_path)
    defaults = type(config)()
    columns = {key: value for key, value in spec.columns.items() if getattr(config, key) == getattr(defaults, key)}
    config = replace(config, **columns, **({} if seed is None else {"seed": seed}))
    adata = read_anndata(cells)
    if annotations is not None:
        add_annotations(adata, annotations)
    with naming_the_file(cells):
        result = pair_cells(adata, spec, config)
    write_pairing(result, out, adata)
    figures = {"n_pairs": len(result.pairs), "transitions": result.summary()}
    write_run_record(out, "pair", config, config.seed, results=figures, inputs={
        "cells": _path_or_none(cells), "transitions": _path_or_none(transitions_path),
        "annotations": _path_or_none(annotations)})
    return StageResult("pair", out, figures, result)



# --- flow: morphology generation ----------------------------------------------------------------
# The flow package's functions already have the stage shape (inputs, one config, out, seed, run
# record, a result with summary()); these wrap them into StageResult like every other stage.


def flow_train(dataset: str | Path, pairs: str | Path, embeddings: str | Path, out: str | Path, config=None, *,
               seed: int = 0, autoencoder: str | Path | None = None) -> StageResult:
    """Train (or reuse) the crop autoencoder and the conditional flow; write FLOW_DIR."""
    from spatia.flow import FlowTrainConfig
    from spatia.flow import flow_train as run

    result = run(dataset, pairs, embeddings, out, config if config is not None else FlowTrainConfig(), seed,
                 autoencoder=autoencoder)
    return StageResult("flow train", Path(out), result.summary(), result)


def flow_generate(flow_dir: str | Path, out: str | Path, config=None, *, seed: int = 0) -> StageResult:
    """Generate the held-out pairs' target crops with a trained flow; write GEN_DIR."""
    from spatia.flow import FlowGenerateConfig
    from spatia.flow import flow_generate as run

    result = run(flow_dir, out, config if config is not None else FlowGenerateConfig(), seed)
    return StageResult("flow generate", Path(out), result.summary(), result)


def flow_evaluate(generated, out: str | Path, config=None, *, seed: int = 0) -> StageResult:
    """Score generated crops (one GEN_DIR or several named ones) and the identity baseline."""
    from spatia.flow import FlowEvaluateConfig
    from spatia.flow import flow_evaluate as run

    result = run(generated, out, config if config is not None else FlowEvaluateConfig(), seed)
    return StageResult("flow evaluate", Path(out), result.summary(), result)


def flow_ablate(dataset: str | Path, pairs: str | Path, embeddings: str | Path, out: str | Path, config=None, *,
                seed: int = 0) -> StageResult:
    """Every variant of the paper's ablation (Tables 5, 6) on one split and seed, scored together."""
    from spatia.flow import FlowAblateConfig
    from spatia.flow import flow_ablate as run

    result = run(dataset, pairs, embeddings, out, config if config is not None else FlowAblateConfig(), seed)
    return StageResult("flow ablate", Path(out), result.summary(), result)


def flow_crossmodal(dataset: str | Path, gene_embeddings: str | Path, flow_dir: str | Path, out: str | Path,
                    config=None, *, seed: int = 0) -> StageResult:
    """Cross-modal generation (Table 11): a cell crop from the cell's gene-only embedding, decoded by a
    trained flow's frozen autoencoder; PSNR/SSIM against the real crop and a label-mean baseline."""
    from spatia.flow import CrossModalConfig
    from spatia.flow import flow_crossmodal as run

    result = run(dataset, gene_embeddings, flow_dir, out, config if config is not None else CrossModalConfig(), seed=seed)
    return StageResult("flow crossmodal", Path(out), result.summary(), result)
