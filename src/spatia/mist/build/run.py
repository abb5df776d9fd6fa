"""`build_dataset`: the build itself (resume checks, the slide loop, the manifest last).

How a build runs (see docs/mist.md for the rules in full):

1. Every source is read once to collect its gene symbols; the vocabulary is their sorted union.
   The resolved config, seed, vocabulary and the SHA-256 of every source file go to
   `.build/state.json` (a resumed build must match it exactly).
2. Each slide is planned from its tables alone: polygon checks and repairs, skipped cells by
   reason, crop centres, the global crop scale factor (a robust percentile of cell sizes), the
   intensity range for uint8 normalisation (percentiles of a coarse pyramid level), niche and
   tissue-region grid positions, and the spatial split.
3. The slide is cut into chunks, one per occupied 1024 x 1024 px tissue region. The main process
   reads each chunk's image window once (plus a margin for the crops of its border cells);
   worker processes (`workers`) render the records; the main process writes them to the three
   LMDB stores in groups and only then marks those chunks done in `.build/progress.lmdb`. Keys
   are deterministic, so a chunk interrupted half-way is rewritten with the same bytes on
   resume.
4. When every chunk of a slide is done its index tables go to `.build/index/`; when every slide
   is done the index tables are concatenated, `spatia_run.json` is written and, last,
   `manifest.json` with `"complete": true`. Readers refuse a directory without it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from spatia.arrays import release_unused_memory
from spatia.config import config_to_dict
from spatia.console import progress
from spatia.errors import InputDataError, OutputWriteError, SpatiaError
from spatia.keys import LEVELS, SPLIT_CODES, SPLIT_NAMES, TRAIN
from spatia.mist.build.checks import check_kept_cells, check_slide_inputs
from spatia.mist.build.ids import chunk_key
from spatia.mist.build.index import concat_parts, region_index_tables, write_cell_index
from spatia.mist.build.jobs import make_job
from spatia.mist.build.output import (
    check_output,
    concat_input_cells,
    output_errors,
    prepare_output,
    remove_output,
    write_input_cells,
)
from spatia.mist.build.plan import SKIP_REASONS, estimate_intensity_range, plan_slide
from spatia.mist.build.sources import fingerprint, load_source, source_label
from spatia.mist.build.stores import BuildStores
from spatia.mist.config import BuildConfig
from spatia.mist.render import ChunkJob, ChunkResult, render_chunk
from spatia.mist.splits import assign_units
from spatia.mist.staging import stage_slide
from spatia.mist.store import (
    BUILD_DIR_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PENDING_MANIFEST_NAME,
    rewrite_store,
    store_path,
)
from spatia.outputs import write_json, write_run_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkDone:
    """Passed to `on_chunk_done` after a chunk is committed."""

    slide_id: str
    chunk_key: str
    chunks_done: int
    chunks_total: int


@dataclass
class BuildSummary:
    """What a build wrote (also in `manifest.json`)."""

    path: Path
    n_slides: int
    n_genes: int
    n_cells: int
    n_niches: int
    n_tissues: int
    skipped: dict[str, int]
    repaired: dict[str, int]
    n_clipped: int
    chunks_rendered: int
    chunks_resumed: int
    seconds: float
    splits: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def cells_per_second(self) -> float:
        return self.n_cells / self.seconds if self.seconds > 0 else float("nan")


def _state(config: BuildConfig, seed: int, sources: list[dict[str, Any]], genes: list[str]) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config_to_dict(config),
        "seed": int(seed),
        "sources": sources,
        "genes": genes,
    }


def _unique_slide_ids(ids: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for sid in ids:
        if sid in seen:
            seen[sid] += 1
            new = f"{sid}_{seen[sid]}"
            log.warning("two slides are named %r; the later one is renamed %r", sid, new)
            out.append(new)
        else:
            seen[sid] = 1
            out.append(sid)
    return out


def _slide_splits(slide_ids: list[str], config: BuildConfig, seed: int) -> list[int | None]:
    if config.split_mode != "slides":
        return [None] * len(slide_ids)
    fixed = {sid: SPLIT_CODES[split] for sid, split in config.slide_splits.items()}
    unknown = sorted(set(fixed) - set(slide_ids))
    if unknown:
        log.warning("slide_splits names slides that are not being built: %s", unknown)
    free = [sid for sid in slide_ids if sid not in fixed]
    codes = assign_units(len(free), config.split_fractions, np.random.default_rng(int(seed)))
    assigned = {**dict(zip(free, (int(c) for c in codes))), **fixed}
    return [assigned[sid] for sid in slide_ids]


def build_dataset(
    sources: Sequence[str | Path | Any],
    out_dir: str | Path,
    config: BuildConfig | None = None,
    *,
    seed: int = 0,
    workers: int = 0,
    on_chunk_done: Callable[[ChunkDone], None] | None = None,
) -> BuildSummary:
    """Build (or resume) a MIST dataset from Xenium bundles.

    Args:
        sources: Xenium output folders (or `XeniumSlide`-like objects), one per slide.
        out_dir: the dataset directory to write; it must not exist, be empty, or hold an
            interrupted build of the same sources, config and seed (which is then resumed).
        config: `BuildConfig` (default: the `cpu` preset).
        seed: seeds the spatial split; same inputs, config and seed give identical records.
        workers: worker processes rendering chunks (0: render in this process). They are
            started with "spawn", so a script calling this needs the usual
            `if __name__ == "__main__":` guard.
        on_chunk_done: called after every committed chunk (progress hooks, tests).

    Returns:
        `BuildSummary`. Raises `SpatiaError` subclasses for bad inputs or output directories.
    """
    started = time.perf_counter()
    config = config or BuildConfig.cpu()
    out_dir = Path(out_dir)
    if not sources:
        raise InputDataError("no Xenium bundle given", fix="pass at least one bundle folder")
    pending = out_dir / PENDING_MANIFEST_NAME
    if pending.exists() and not (out_dir / BUILD_DIR_NAME).exists() and not (out_dir / MANIFEST_NAME).exists():
        # killed between the last two steps of a build (every record and table written): finish it
        os.replace(pending, out_dir / MANIFEST_NAME)
        log.info("completed the build in %s (it was interrupted after its last file was written)", out_dir)
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
        return _summary(out_dir, manifest, 0, sum(s["n_chunks"] for s in manifest["slides"]), started)
    interrupted = check_output(out_dir)
    existed = out_dir.exists()

    # pass 1: slide IDs, genes and source fingerprints; inputs that would give a wrong dataset
    # are refused here, before anything is written
    first_slide = None
    infos = []
    genes: set[str] = set()
    for k, source in enumerate(sources):
        slide = load_source(source)
        check_slide_inputs(slide, str(slide.slide_id), config)
        genes.update(str(g) for g in slide.gene_names)
        infos.append({"source": source_label(source), "slide_id": str(slide.slide_id), "files": fingerprint(slide)})
        if len(sources) == 1:
            first_slide = slide  # reused below instead of read twice (one slide held at a time)
        del slide
    vocabulary_list = sorted(genes)
    slide_ids = _unique_slide_ids([info["slide_id"] for info in infos])
    state = _state(config, seed, infos, vocabulary_list)
    try:
        with output_errors(out_dir):
            prepare_output(out_dir, state, interrupted)
            if interrupted:
                log.info("resuming the interrupted build in %s", out_dir)
            summary = _build(sources, out_dir, config, seed, workers, on_chunk_done, first_slide, slide_ids, infos,
                             vocabulary_list, started)
    except OutputWriteError:
        raise  # what was written stays: once there is room, rerunning the command resumes
    except SpatiaError:
        if not interrupted:  # a build that failed on its input leaves nothing behind
            remove_output(out_dir, existed)
        raise
    log.info(
        "built %s: %d cells, %d niches, %d tissue regions; skipped %s",
        out_dir, summary.n_cells, summary.n_niches, summary.n_tissues, summary.skipped,
    )  # fmt: skip
    return summary


def _build(sources, out_dir, config, seed, workers, on_chunk_done, first_slide, slide_ids, infos, vocabulary_list,
           started) -> BuildSummary:
    """The slide loop and the finalisation of `build_dataset` (inputs already checked)."""
    vocabulary = {g: i for i, g in enumerate(vocabulary_list)}
    splits = _slide_splits(slide_ids, config, seed)
    stores = BuildStores(out_dir, config)
    pool = None
    if workers > 0:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    rendered = resumed = 0
    slide_entries = []
    try:
        with progress() as bar:
            task = bar.add_task("building MIST", total=None)
            totals = {"done": 0, "total": 0}
            for k, source in enumerate(sources):
                done_entry = stores.get(f"slide/{k}")
                if done_entry is not None:
                    entry = json.loads(done_entry)
                    slide_entries.append(entry)
                    totals["done"] += entry["n_chunks"]
                    totals["total"] += entry["n_chunks"]
                    resumed += entry["n_chunks"]
                    bar.update(task, total=totals["total"], completed=totals["done"])
                    continue
                slide = first_slide if k == 0 and first_slide is not None else load_source(source)
                first_slide = None
                entry, n_rendered, n_resumed = _build_slide(
                    slide, k, slide_ids[k], infos[k], vocabulary, config, seed, splits[k], stores, out_dir, pool,
                    workers, bar, task, totals, on_chunk_done,
                )  # fmt: skip
                rendered += n_rendered
                resumed += n_resumed
                slide_entries.append(entry)
                stores.put(f"slide/{k}", json.dumps(entry).encode())
                del slide
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        stores.close()

    if not any(entry["n_cells"] for entry in slide_entries):
        skipped = {name: sum(e["skipped"][name] for e in slide_entries) for name in SKIP_REASONS}
        raise InputDataError(
            f"the build keeps no cell (skipped: {', '.join(f'{k} {v}' for k, v in skipped.items() if v)})",
            path=Path(infos[0]["source"]) if len(infos) == 1 else None,
            fix="see the skip reasons in docs/mist.md; an empty dataset is never written",
        )
    if config.split_mode == "blocks" and not any(e["splits"]["cell"].get(TRAIN, 0) for e in slide_entries):
        # still a valid dataset to embed with a pretrained model; `spatia pretrain` refuses it
        log.warning("the spatial split (seed %d) leaves no train cell: every train cell lies within "
                    "split_buffer_um = %g um of a val or test block; the dataset can be embedded but not "
                    "pretrained on (build again with another --seed or a smaller --split-buffer-um)",
                    seed, config.split_buffer_um)
    manifest = _finalise(out_dir, config, seed, vocabulary_list, slide_entries)
    return _summary(out_dir, manifest, rendered, resumed, started)


def _summary(out_dir: Path, manifest: dict[str, Any], rendered: int, resumed: int, started: float) -> BuildSummary:
    return BuildSummary(
        path=out_dir,
        n_slides=len(manifest["slides"]),
        n_genes=len(manifest["genes"]),
        n_cells=manifest["levels"]["cell"]["n_records"],
        n_niches=manifest["levels"]["niche"]["n_records"],
        n_tissues=manifest["levels"]["tissue"]["n_records"],
        skipped=manifest["skipped"],
        repaired=manifest["repaired"],
        n_clipped=manifest["n_clipped"],
        chunks_rendered=rendered,
        chunks_resumed=resumed,
        seconds=time.perf_counter() - started,
        splits=manifest["splits"],
    )


def _build_slide(
    slide, k, slide_id, info, vocabulary, config, seed, split, stores, out_dir, pool, workers, bar, task, totals, on_chunk_done
):
    """Plan, render and commit every chunk of one slide; write its index parts. Returns the
    slide's manifest entry and the numbers of chunks rendered and found already done."""
    circles = config.circle_radius_um if config.segmentation == "circles" else None
    staged = stage_slide(slide, vocabulary, out_dir / BUILD_DIR_NAME / "stage" / f"{k:05d}", circle_radius_um=circles)
    plan = plan_slide(slide, staged, k, slide_id, vocabulary, config, seed, split)
    check_kept_cells(plan, slide, config)
    if not plan.chunks:
        log.warning("slide %s: no cell was kept (see the skipped counts)", slide_id)
    normalisation = estimate_intensity_range(slide.image, config) if plan.chunks else {}
    plan.normalisation = normalisation
    cell_ids = np.asarray(slide.cells.index.astype(str))
    n_genes = len(vocabulary)
    todo = [c for c in plan.chunks if not stores.is_done(f"chunk/{chunk_key(k, *c)}")]
    n_resumed = len(plan.chunks) - len(todo)
    totals["total"] += len(plan.chunks)
    totals["done"] += n_resumed
    bar.update(task, total=totals["total"], completed=totals["done"], description=f"building MIST: {slide_id}")

    def report(keys: list[str]) -> None:
        if not keys:
            return
        write_json(
            out_dir / BUILD_DIR_NAME / "progress.json", {"done": totals["done"] + len(keys), "total": totals["total"]}, overwrite=True
        )
        for key in keys:
            totals["done"] += 1
            bar.update(task, completed=totals["done"])
            if on_chunk_done is not None:
                on_chunk_done(ChunkDone(slide_id, key, totals["done"], totals["total"]))

    def committed(result: ChunkResult) -> None:
        report(stores.add(result))

    def job(c: tuple[int, int]) -> ChunkJob:
        return make_job(plan, slide, staged, cell_ids, c[0], c[1], config, n_genes, normalisation)

    if pool is None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            for c in todo:
                committed(render_chunk(job(c)))
    else:
        pending = set()
        queue = iter(todo)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < 2 * workers:
                c = next(queue, None)
                if c is None:
                    exhausted = True
                    break
                pending.add(pool.submit(render_chunk, job(c)))
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                committed(future.result())
    report(stores.flush())

    index_dir = out_dir / BUILD_DIR_NAME / "index"
    cell_splits = write_cell_index(plan, slide, config, index_dir / f"{k:05d}_cell.parquet", staged.directory)
    write_input_cells(plan, slide, config, staged, index_dir / f"{k:05d}_input_cells.parquet")
    shutil.rmtree(staged.directory, ignore_errors=True)  # the slide's staged tables are no longer needed
    niches_df, tissues_df = region_index_tables(plan, config)
    for level, frame in (("niche", niches_df), ("tissue", tissues_df)):
        part = index_dir / f"{k:05d}_{level}.parquet"
        tmp = part.with_name(part.name + ".tmp")
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, part)
    release_unused_memory()

    kept = plan.kept
    skipped = {name: int((plan.reason == i + 1).sum()) for i, name in enumerate(SKIP_REASONS)}
    measured = np.unique(plan.gene_columns)
    entry = {
        "slide_id": slide_id,
        "slide_index": k,
        "source": info["source"],
        "source_slide_id": str(slide.slide_id),
        "pixel_size_um": plan.pixel_size_um,
        "image_shape_yx": list(plan.image_shape_yx),
        "image_dtype": str(np.dtype(slide.image.dtype)),
        "n_cells_input": int(len(plan.reason)),
        "n_cells": int(kept.sum()),
        "n_niches": int(len(niches_df)),
        "n_tissues": int(len(tissues_df)),
        "n_chunks": len(plan.chunks),
        "skipped": skipped,
        "repaired": {"self_intersecting_polygon": int(plan.repaired.sum())},
        "scale": plan.scale,
        "normalisation": normalisation,
        "n_genes_measured": int(len(measured)),
        "measured_gene_indices": measured.tolist(),
        "duplicate_gene_symbols": int(len(plan.gene_columns) - len(measured)),
        "cluster_columns": list(slide.cluster_columns),
        "split": None if split is None else SPLIT_NAMES[split],
        "splits": {
            "cell": {name: cell_splits[name] for name in SPLIT_NAMES if name in cell_splits},
            "niche": niches_df["split"].value_counts().to_dict(),
            "tissue": tissues_df["split"].value_counts().to_dict(),
        },
        "source_checksums_sha256": info["files"],
        "reader_problems": [*(getattr(slide, "problems", []) or []), *staged.problems],
    }
    log.info(
        "slide %s: %d of %d cells kept, %d niches, %d tissue regions, scale %.4f (%d clipped)",
        slide_id, entry["n_cells"], entry["n_cells_input"], entry["n_niches"], entry["n_tissues"],
        plan.scale["factor"], plan.scale["n_clipped"],
    )  # fmt: skip
    return entry, len(todo), n_resumed


def _finalise(out_dir: Path, config: BuildConfig, seed: int, genes: list[str], slides: list[dict]) -> dict[str, Any]:
    counts = {level: concat_parts(out_dir, level, len(slides)) for level in LEVELS}
    input_parts = [out_dir / BUILD_DIR_NAME / "index" / f"{k:05d}_input_cells.parquet" for k in range(len(slides))]
    if all(p.is_file() for p in input_parts):  # (a build resumed from an older spatia lacks them)
        concat_input_cells(out_dir, input_parts)
    skipped = {name: sum(s["skipped"][name] for s in slides) for name in SKIP_REASONS}
    repaired = {"self_intersecting_polygon": sum(s["repaired"]["self_intersecting_polygon"] for s in slides)}
    splits: dict[str, dict[str, int]] = {}
    for level in LEVELS:
        merged: dict[str, int] = {}
        for s in slides:
            for name, n in s["splits"][level].items():
                merged[name] = merged.get(name, 0) + int(n)
        splits[level] = {name: merged[name] for name in SPLIT_NAMES if name in merged}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": True,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "builder_config": config_to_dict(config),
        "seed": int(seed),
        "genes": genes,
        "levels": {
            "cell": {"n_records": counts["cell"], "image_px": config.cell_image_px, "has_mask": True},
            "niche": {"n_records": counts["niche"], "image_px": config.niche_image_px, "tile_px": config.niche_px},
            "tissue": {
                "n_records": counts["tissue"],
                "image_px": config.tissue_image_px,
                "tile_px": config.tissue_px,
                "grid": config.tissue_niches,
            },
        },
        "skipped": skipped,
        "repaired": repaired,
        "n_clipped": sum(s["scale"]["n_clipped"] for s in slides),
        "splits": splits,
        "slides": slides,
    }
    for level in LEVELS:
        rewrite_store(store_path(out_dir, level), config.lmdb_map_size_gb)
    write_run_record(out_dir, "build", config, seed)
    # the manifest appears last, after .build/ is gone: a build killed at any point leaves either
    # an interrupted build (resumed by rerunning it) or a complete dataset without .build/
    write_json(out_dir / PENDING_MANIFEST_NAME, manifest, overwrite=True)
    shutil.rmtree(out_dir / BUILD_DIR_NAME)
    _publish_manifest(out_dir)
    return manifest


def _publish_manifest(out_dir: Path) -> None:
    """The last step of a build: the pending manifest becomes `manifest.json`."""
    os.replace(out_dir / PENDING_MANIFEST_NAME, out_dir / MANIFEST_NAME)
