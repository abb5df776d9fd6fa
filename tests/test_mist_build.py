"""`build_dataset` on a simulated Xenium bundle: record contents against independent
references, niche and tissue bookkeeping, manifest, splits, resume and refusal rules."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from skimage.draw import polygon as draw_polygon

from spatia.errors import DatasetError, OutputExistsError
from spatia.io.xenium import read_xenium
from spatia.mist import BuildConfig, CellDataset, MultiScaleDataset, build_dataset, decode_record
from spatia.mist.build import plan as plan_module
from spatia.mist.build import stores as stores_module
from spatia.mist.info import dataset_info

CONFIG = BuildConfig.cpu()


def records(root: Path, level: str) -> dict[bytes, bytes]:
    env = lmdb.open(str(root / f"{level}.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        out = dict(txn.cursor())
    env.close()
    return out


def snapshot(root: Path) -> dict:
    """Everything a build wrote that must not depend on how it ran: record bytes, index
    tables, and the manifest without its timestamp."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.pop("created_utc")
    return {
        "records": {level: records(root, level) for level in ("cell", "niche", "tissue")},
        "index": {level: pd.read_parquet(root / f"{level}_index.parquet") for level in ("cell", "niche", "tissue")},
        "manifest": manifest,
    }


def assert_same(a: dict, b: dict) -> None:
    for level in ("cell", "niche", "tissue"):
        assert a["records"][level].keys() == b["records"][level].keys()
        assert a["records"][level] == b["records"][level], f"{level} records differ"
        pd.testing.assert_frame_equal(a["index"][level], b["index"][level])
    assert a["manifest"] == b["manifest"]


@pytest.fixture(scope="module")
def built(simulated_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("mist") / "dataset"
    summary = build_dataset([simulated_bundle], out, CONFIG, seed=0)
    return out, summary


@pytest.fixture(scope="module")
def slide(simulated_bundle):
    return read_xenium(simulated_bundle)


@pytest.fixture(scope="module")
def reference(built, slide):
    """The whole slide, normalised with the recorded range, and resampled in one go by torch
    at the recorded scale factors: an independent reference for every stored image."""
    root, _ = built
    entry = json.loads((root / "manifest.json").read_text())["slides"][0]
    low, high = entry["normalisation"]["low"], entry["normalisation"]["high"]
    raw = slide.image.read_level(0, channel=0).astype(np.float32)
    norm = np.clip((raw - low) * (255.0 / (high - low)), 0, 255).astype(np.float32)

    def resampled(scale: float) -> np.ndarray:
        return torch.nn.functional.interpolate(
            torch.from_numpy(norm)[None, None], scale_factor=scale, mode="bilinear", antialias=True,
            align_corners=False, recompute_scale_factor=False,
        )[0, 0].numpy()  # fmt: skip

    return {"entry": entry, "raw": raw, "resampled": resampled}


def test_summary_and_manifest(built, slide, simulated_bundle):
    root, summary = built
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["format"] == "spatia-mist"
    assert not (root / ".build").exists()
    assert (root / "spatia_run.json").is_file()
    assert manifest["genes"] == sorted(slide.gene_names)
    entry = manifest["slides"][0]
    assert entry["measured_gene_indices"] == list(range(len(slide.gene_names)))
    assert entry["n_cells_input"] == slide.n_cells
    assert entry["n_cells"] + sum(entry["skipped"].values()) == slide.n_cells
    for level, n in (("cell", summary.n_cells), ("niche", summary.n_niches), ("tissue", summary.n_tissues)):
        assert manifest["levels"][level]["n_records"] == n == len(records(root, level))
        assert len(pd.read_parquet(root / f"{level}_index.parquet")) == n
    for name, digest in entry["source_checksums_sha256"].items():
        assert hashlib.sha256((simulated_bundle / name).read_bytes()).hexdigest() == digest
    assert "ground_truth.parquet" in entry["source_checksums_sha256"]
    # the recorded intensity range is the configured percentiles of the non-zero pixels
    pixels = slide.image.read_level(0, channel=0)
    pixels = pixels[pixels > 0]
    lo, hi = np.percentile(pixels, CONFIG.norm_percentiles)
    span = float(pixels.max() - pixels.min())
    assert abs(entry["normalisation"]["low"] - lo) < 0.02 * span
    assert abs(entry["normalisation"]["high"] - hi) < 0.02 * span
    # the scale factor maps the configured percentile of bounding-square sides to the crop size
    index = pd.read_parquet(root / "cell_index.parquet")
    side = np.percentile(index["bbox_side_px"], CONFIG.scale_percentile)
    assert entry["scale"]["factor"] == pytest.approx(CONFIG.cell_image_px / side, rel=1e-9)
    clipped = index["bbox_side_px"] * entry["scale"]["factor"] > CONFIG.cell_image_px + 1e-9
    assert index["clipped"].tolist() == clipped.tolist()
    assert entry["scale"]["n_clipped"] == int(clipped.sum()) > 0
    # labels and ground truth travel into the index
    column = slide.cluster_columns[0]
    labels = slide.cells.loc[index["cell_id"], column]
    expected_labels = [None if pd.isna(v) else str(v) for v in labels]
    assert index[f"label_{column}"].tolist() == expected_labels
    assert index[f"label_{column}"].notna().mean() > 0.9
    truth = pd.read_parquet(simulated_bundle / "ground_truth.parquet").set_index("cell_id")
    assert (index["truth_cell_type"].to_numpy() == truth.loc[index["cell_id"], "cell_type"].astype(str).to_numpy()).all()


def test_cell_crops_and_masks_match_independent_references(built, slide, reference):
    root, _ = built
    index = pd.read_parquet(root / "cell_index.parquet")
    cell_records = records(root, "cell")
    factor = reference["entry"]["scale"]["factor"]
    grid = reference["resampled"](factor)
    size = CONFIG.cell_image_px
    h, w = reference["raw"].shape
    rows = slide.cells.index.get_indexer(index["cell_id"])
    polygons = slide.cell_boundaries
    compared = 0
    rng = np.random.default_rng(0)
    shapely_checked = set(rng.choice(len(index), 300, replace=False).tolist())
    for i, (key, cx, cy) in enumerate(zip(index["key"], index["crop_x_px"], index["crop_y_px"])):
        record = decode_record(cell_records[key.encode()])
        assert record.image.shape == (size, size) and record.mask.shape == (size, size)
        assert not record.image[~record.mask].any(), "pixels outside the polygon must be zero"
        u0, v0 = int(round(cx * factor - size / 2)), int(round(cy * factor - size / 2))
        # crops whose kernel reaches past the slide edge differ from torch's edge rule: skip those
        radius = max(1.0, 1.0 / factor)
        if u0 / factor - radius < 0 or v0 / factor - radius < 0 or (u0 + size) / factor + radius > w or (v0 + size) / factor + radius > h:
            continue
        expected = np.rint(grid[v0 : v0 + size, u0 : u0 + size])
        diff = np.abs(record.image.astype(np.float32) - expected)[record.mask]
        assert diff.max(initial=0) <= 1, f"cell {key}: crop differs from the reference"
        compared += 1
        if i in shapely_checked:
            poly = shapely.Polygon(polygons.polygon(rows[i]) / slide.pixel_size_um)
            gx, gy = np.meshgrid((u0 + np.arange(size) + 0.5) / factor, (v0 + np.arange(size) + 0.5) / factor)
            inside = shapely.contains_xy(poly, gx, gy)
            boundary = shapely.distance(poly.exterior, shapely.points(gx, gy)) < 1e-6
            assert np.array_equal(record.mask[~boundary], inside[~boundary]), f"cell {key}: mask differs from its polygon"
    assert compared > 0.8 * len(index)


def test_every_crop_holds_its_nucleus_signal(built, slide):
    root, _ = built
    index = pd.read_parquet(root / "cell_index.parquet")
    cell_records = records(root, "cell")
    entry = json.loads((root / "manifest.json").read_text())["slides"][0]
    factor, size = entry["scale"]["factor"], CONFIG.cell_image_px
    rows = slide.cells.index.get_indexer(index["cell_id"])
    nuclei = slide.nucleus_boundaries
    brighter = 0
    n = 0
    for i, (key, cx, cy) in enumerate(zip(index["key"], index["crop_x_px"], index["crop_y_px"])):
        vertices = nuclei.polygon(rows[i]) / slide.pixel_size_um
        if len(vertices) < 3:
            continue
        u0, v0 = round(cx * factor - size / 2), round(cy * factor - size / 2)
        x, y = vertices[:, 0] * factor - u0, vertices[:, 1] * factor - v0
        assert x.min() >= 0 and y.min() >= 0 and x.max() <= size and y.max() <= size, f"{key}: nucleus cut off"
        rr, cc = draw_polygon(y - 0.5, x - 0.5, (size, size))
        nucleus = np.zeros((size, size), dtype=bool)
        nucleus[rr, cc] = True
        record = decode_record(cell_records[key.encode()])
        assert (nucleus & record.mask).sum() >= 0.95 * nucleus.sum(), f"{key}: nucleus outside the cell mask"
        rest = record.mask & ~nucleus
        brighter += record.image[nucleus].mean() > (record.image[rest].mean() if rest.any() else 0)
        n += 1
    assert n > 0.9 * len(index)
    assert brighter >= 0.98 * n


def test_niche_records_sum_their_member_cells(built, reference):
    root, _ = built
    cells = pd.read_parquet(root / "cell_index.parquet")
    niches = pd.read_parquet(root / "niche_index.parquet")
    cell_records = {k.decode(): decode_record(v) for k, v in records(root, "cell").items()}
    niche_records = records(root, "niche")
    n_genes = len(json.loads((root / "manifest.json").read_text())["genes"])
    members = cells.groupby("niche_id", sort=False)
    assert set(members.groups) == set(niches["niche_id"]), "every niche has cells and every cell a stored niche"
    scale = CONFIG.niche_image_px / CONFIG.niche_px
    grid = reference["resampled"](scale)
    h, w = reference["raw"].shape
    for niche in niches.itertuples():
        record = decode_record(niche_records[niche.key.encode()])
        member_rows = members.get_group(niche.niche_id)
        assert record.meta["cell_ids"] == member_rows["cell_id"].tolist()
        assert record.meta["grid_rc"] == [niche.niche_row, niche.niche_col]
        assert niche.n_cells == len(member_rows)
        expected = sum(cell_records[k].dense_counts(n_genes, np.int64) for k in member_rows["key"])
        np.testing.assert_array_equal(record.dense_counts(n_genes, np.int64), expected)
        assert niche.total_counts == expected.sum()
        # cells belong to the niche their centroid falls in
        assert (np.floor(member_rows["x_centroid_px"] / CONFIG.niche_px) == niche.niche_col).all()
        assert (np.floor(member_rows["y_centroid_px"] / CONFIG.niche_px) == niche.niche_row).all()
        # the niche image is its 256 px tile resampled to niche_image_px (interior niches)
        x0, y0 = niche.niche_col * CONFIG.niche_px, niche.niche_row * CONFIG.niche_px
        if x0 >= 8 and y0 >= 8 and x0 + CONFIG.niche_px + 8 <= w and y0 + CONFIG.niche_px + 8 <= h:
            s = CONFIG.niche_image_px
            expected_image = np.rint(grid[niche.niche_row * s : (niche.niche_row + 1) * s, niche.niche_col * s : (niche.niche_col + 1) * s])
            assert np.abs(record.image.astype(np.float32) - expected_image).max() <= 1


def test_tissue_grids_hold_the_right_niches(built, reference):
    root, _ = built
    niches = pd.read_parquet(root / "niche_index.parquet")
    tissues = pd.read_parquet(root / "tissue_index.parquet")
    niche_records = records(root, "niche")
    tissue_records = records(root, "tissue")
    n_genes = len(json.loads((root / "manifest.json").read_text())["genes"])
    tn = CONFIG.tissue_niches
    assert set(niches["tissue_id"]) == set(tissues["tissue_id"])
    grid = reference["resampled"](CONFIG.tissue_image_px / CONFIG.tissue_px)
    h, w = reference["raw"].shape
    for tissue in tissues.itertuples():
        record = decode_record(tissue_records[tissue.key.encode()])
        inside = niches[(niches["niche_row"] // tn == tissue.tissue_row) & (niches["niche_col"] // tn == tissue.tissue_col)]
        assert set(inside["tissue_id"]) == {tissue.tissue_id}
        slots = [""] * (tn * tn)
        for n in inside.itertuples():
            assert (n.grid_row, n.grid_col) == (n.niche_row % tn, n.niche_col % tn)
            slots[n.grid_row * tn + n.grid_col] = n.niche_id
        assert record.meta["niche_ids"] == slots
        assert record.meta["grid_rc"] == [tissue.tissue_row, tissue.tissue_col]
        assert tissue.n_niches == len(inside) and tissue.n_cells == inside["n_cells"].sum()
        expected = sum(decode_record(niche_records[k.encode()]).dense_counts(n_genes, np.int64) for k in inside["key"])
        np.testing.assert_array_equal(record.dense_counts(n_genes, np.int64), expected)
        assert record.image.shape == (CONFIG.tissue_image_px, CONFIG.tissue_image_px)
        x0, y0 = tissue.x0_px, tissue.y0_px
        if x0 >= 16 and y0 >= 16 and x0 + CONFIG.tissue_px + 16 <= w and y0 + CONFIG.tissue_px + 16 <= h:
            s = CONFIG.tissue_image_px
            ref = np.rint(grid[tissue.tissue_row * s : (tissue.tissue_row + 1) * s, tissue.tissue_col * s : (tissue.tissue_col + 1) * s])
            assert np.abs(record.image.astype(np.float32) - ref).max() <= 1


def test_splits_are_spatially_disjoint_with_a_buffer(built):
    root, _ = built
    cells = pd.read_parquet(root / "cell_index.parquet")
    niches = pd.read_parquet(root / "niche_index.parquet")
    tissues = pd.read_parquet(root / "tissue_index.parquet").set_index("tissue_id")
    assert set(tissues["split"]) <= {"train", "val", "test"}
    assert {"train", "test"} <= set(tissues["split"])
    tissue_split = tissues.loc[cells["tissue_id"], "split"].to_numpy()
    buffer = cells["split"].to_numpy() == "buffer"
    assert (cells["split"].to_numpy()[~buffer] == tissue_split[~buffer]).all()
    assert (tissue_split[buffer] == "train").all()
    assert (niches["split"].to_numpy() == tissues.loc[niches["tissue_id"], "split"].to_numpy()).all()
    # distance of every train/buffer cell to the nearest val/test tissue region
    held_out = tissues[tissues["split"] != "train"]
    side = CONFIG.tissue_px
    x, y = cells["x_centroid_px"].to_numpy()[:, None], cells["y_centroid_px"].to_numpy()[:, None]
    x0, y0 = held_out["x0_px"].to_numpy()[None, :], held_out["y0_px"].to_numpy()[None, :]
    dx = np.maximum(np.maximum(x0 - x, x - (x0 + side)), 0)
    dy = np.maximum(np.maximum(y0 - y, y - (y0 + side)), 0)
    distance_um = np.hypot(dx, dy).min(axis=1) * 0.2125
    train = cells["split"].to_numpy() == "train"
    assert (distance_um[train] >= CONFIG.split_buffer_um).all()
    assert (distance_um[buffer] < CONFIG.split_buffer_um).all() and buffer.any()


def test_interrupted_build_is_refused_by_readers_then_resumes_identically(built, simulated_bundle, tmp_path, monkeypatch):
    reference_root, summary = built
    monkeypatch.setattr(stores_module.BuildStores, "FLUSH_SECONDS", 0.0)  # commit every chunk
    out = tmp_path / "dataset"

    def stop_after_three(info):
        if info.chunks_done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dataset([simulated_bundle], out, CONFIG, seed=0, on_chunk_done=stop_after_three)
    assert not (out / "manifest.json").exists()
    for reader in (CellDataset, MultiScaleDataset, dataset_info):
        with pytest.raises(DatasetError, match=r"incomplete.*3 of \d+ chunks"):
            reader(out)
    resumed = build_dataset([simulated_bundle], out, CONFIG, seed=0)
    assert resumed.chunks_resumed == 3 and resumed.chunks_rendered == summary.chunks_rendered - 3
    assert_same(snapshot(out), snapshot(reference_root))


def test_build_killed_mid_commit_resumes_identically(built, simulated_bundle, tmp_path, monkeypatch):
    """A crash after a chunk's cell records are committed but before its niche records (and
    its done-marker) are: the resumed build rewrites it, with no duplicates."""
    reference_root, _ = built
    monkeypatch.setattr(stores_module.BuildStores, "FLUSH_SECONDS", 0.0)
    out = tmp_path / "dataset"
    real_write = stores_module.write_records
    calls = {"n": 0}

    def failing_write(env, items):
        calls["n"] += 1
        if calls["n"] == 6:  # chunk 1: cell, niche, tissue, marker; chunk 2: cell, then this niche write
            raise OSError("disk vanished")
        return real_write(env, items)

    monkeypatch.setattr(stores_module, "write_records", failing_write)
    with pytest.raises(OSError, match="disk vanished"):
        build_dataset([simulated_bundle], out, CONFIG, seed=0)
    monkeypatch.setattr(stores_module, "write_records", real_write)
    with lmdb.open(str(out / "cell.lmdb"), readonly=True, lock=False) as env:
        assert env.stat()["entries"] > 0
    resumed = build_dataset([simulated_bundle], out, CONFIG, seed=0)
    assert resumed.chunks_resumed == 1
    assert_same(snapshot(out), snapshot(reference_root))


def test_hard_killed_build_resumes_identically(built, simulated_bundle, tmp_path):
    """`os._exit` in the middle of a build (no cleanup, like SIGKILL), then a resume."""
    reference_root, _ = built
    out = tmp_path / "dataset"
    script = (
        "import os, sys\n"
        "from spatia.mist import build_dataset\n"
        "from spatia.mist.build.stores import BuildStores\n"
        "BuildStores.FLUSH_SECONDS = 0.0\n"
        "def die(info):\n"
        "    if info.chunks_done == 2:\n"
        "        os._exit(137)\n"
        "build_dataset([sys.argv[1]], sys.argv[2], seed=0, on_chunk_done=die)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(simulated_bundle), str(out)], capture_output=True, timeout=120)
    assert result.returncode == 137, result.stderr.decode()[-2000:]
    assert (out / ".build").is_dir() and not (out / "manifest.json").exists()
    resumed = build_dataset([simulated_bundle], out, CONFIG, seed=0)
    assert resumed.chunks_resumed == 2
    assert_same(snapshot(out), snapshot(reference_root))
    assert store_bytes(out) == store_bytes(reference_root)


def test_worker_processes_write_the_same_dataset(built, simulated_bundle, tmp_path):
    reference_root, _ = built
    out = tmp_path / "dataset"
    build_dataset([simulated_bundle], out, CONFIG, seed=0, workers=2)
    assert_same(snapshot(out), snapshot(reference_root))
    assert store_bytes(out) == store_bytes(reference_root)  # committed in another order: same bytes


def test_streamed_in_small_batches_or_given_in_memory_the_same_dataset(built, simulated_bundle, slide, tmp_path, monkeypatch):
    """The builder streams counts, polygons and ground truth from the bundle's files in
    batches: batch boundaries anywhere (inside a polygon's rows, a block of cells) change
    nothing, and a slide handed over in memory gives the same records and index."""
    from spatia.io import polygons
    from spatia.mist import staging

    reference = snapshot(built[0])
    monkeypatch.setattr(polygons, "_VERTEX_BATCH_ROWS", 997)  # prime: runs of a polygon's rows are cut
    monkeypatch.setattr(staging, "COUNT_BLOCK_NONZERO", 1_000)
    monkeypatch.setattr(staging, "TRUTH_BATCH_ROWS", 333)
    monkeypatch.setattr(plan_module, "_PLAN_BLOCK_CELLS", 250)
    out = tmp_path / "small_batches"
    build_dataset([simulated_bundle], out, CONFIG, seed=0)
    assert_same(snapshot(out), reference)

    in_memory = snapshot_without_source(build_dataset([slide], tmp_path / "in_memory", CONFIG, seed=0).path)
    expected = snapshot_without_source(built[0])
    for level in ("cell", "niche", "tissue"):
        assert in_memory["records"][level] == expected["records"][level], f"{level} records differ"
        pd.testing.assert_frame_equal(in_memory["index"][level], expected["index"][level])
    assert in_memory["manifest"] == expected["manifest"]


def snapshot_without_source(root: Path) -> dict:
    """`snapshot` without what names the source (a path or an in-memory object) and what the
    reader read and noted (an in-memory read also reads the nucleus boundaries and notes
    polygons past the image edge)."""
    taken = snapshot(root)
    for entry in taken["manifest"]["slides"]:
        for name in ("source", "reader_problems", "source_checksums_sha256"):
            entry.pop(name)
    return taken


def test_refusals(built, simulated_bundle, tmp_path, monkeypatch):
    root, _ = built
    with pytest.raises(OutputExistsError, match="complete MIST dataset already exists"):
        build_dataset([simulated_bundle], root, CONFIG, seed=0)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not an empty directory"):
        build_dataset([simulated_bundle], busy, CONFIG, seed=0)
    assert (busy / "notes.txt").read_text() == "mine"
    # an interrupted build resumed with another seed or config is refused
    monkeypatch.setattr(stores_module.BuildStores, "FLUSH_SECONDS", 0.0)
    out = tmp_path / "interrupted"

    def stop(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dataset([simulated_bundle], out, CONFIG, seed=0, on_chunk_done=stop)
    with pytest.raises(DatasetError, match="differs in: seed"):
        build_dataset([simulated_bundle], out, CONFIG, seed=1)
    with pytest.raises(DatasetError, match="differs in: config"):
        build_dataset([simulated_bundle], out, BuildConfig.cpu(cell_image_px=32), seed=0)
    assert os.path.isdir(out / ".build")


def store_bytes(root: Path) -> dict[str, bytes]:
    return {level: (root / f"{level}.lmdb" / "data.mdb").read_bytes() for level in ("cell", "niche", "tissue")}


def test_same_inputs_give_byte_identical_stores(built, simulated_bundle, tmp_path, monkeypatch):
    """Committed in other groups (every chunk on its own), the stores hold the same bytes, so a
    checksum tells two builds apart; no writer lock file is left beside them."""
    reference_root, _ = built
    monkeypatch.setattr(stores_module.BuildStores, "FLUSH_SECONDS", 0.0)
    out = build_dataset([simulated_bundle], tmp_path / "dataset", CONFIG, seed=0).path
    assert store_bytes(out) == store_bytes(reference_root)
    assert not any((out / f"{level}.lmdb" / "lock.mdb").exists() for level in ("cell", "niche", "tissue"))


def _run_and_die(bundle: Path, out: Path, patch: str) -> subprocess.CompletedProcess:
    script = (
        "import os, sys\n"
        "from spatia.mist import build_dataset\n"
        "from spatia.mist.build import run\n"
        f"{patch}\n"
        "build_dataset([sys.argv[1]], sys.argv[2], seed=0)\n"
    )
    return subprocess.run([sys.executable, "-c", script, str(bundle), str(out)], capture_output=True, timeout=180)


def test_killed_right_after_the_manifest_leaves_no_build_directory(built, simulated_bundle, tmp_path):
    out = tmp_path / "dataset"
    patch = (
        "publish = run._publish_manifest\n"
        "def die(out_dir):\n"
        "    publish(out_dir)\n"
        "    os._exit(137)\n"
        "run._publish_manifest = die"
    )
    result = _run_and_die(simulated_bundle, out, patch)
    assert result.returncode == 137, result.stderr.decode()[-2000:]
    assert (out / "manifest.json").exists() and not (out / ".build").exists()
    assert_same(snapshot(out), snapshot(built[0]))


def test_killed_before_the_manifest_is_published_the_rerun_completes_it(built, simulated_bundle, tmp_path):
    out = tmp_path / "dataset"
    patch = (
        "write = run.write_json\n"
        "def die(path, *args, **kwargs):\n"
        "    write(path, *args, **kwargs)\n"
        "    if str(path).endswith('manifest.json.pending'):\n"
        "        os._exit(137)\n"
        "run.write_json = die"
    )
    result = _run_and_die(simulated_bundle, out, patch)
    assert result.returncode == 137, result.stderr.decode()[-2000:]
    assert (out / "manifest.json.pending").exists() and not (out / "manifest.json").exists()
    summary = build_dataset([simulated_bundle], out, CONFIG, seed=0)
    assert summary.n_cells == built[1].n_cells
    assert not (out / ".build").exists() and not (out / "manifest.json.pending").exists()
    assert_same(snapshot(out), snapshot(built[0]))
    assert store_bytes(out) == store_bytes(built[0])
