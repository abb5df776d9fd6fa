"""Plain helpers shared by several test files (fixtures live in conftest.py).

Synthetic data for tests is made here: whole bundles come from the simulator (`spatia.sim`,
the `simulated_bundle` fixture); small hand-made files whose every value a test controls come
from `write_pyramid` (an OME-TIFF pyramid) and `write_10x_h5` (a 10x feature matrix), written
independently of `spatia.sim.writer` so that the readers are checked against a second
implementation of each format.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import lmdb
import numpy as np
import scipy.sparse as sp
import tifffile

from spatia.mist import decode_record
from spatia.model.config import SpatiaConfig, load_config


def plumbing_config(name: str = "tiny") -> SpatiaConfig:
    """A packaged config that embeds each cell crop as is (`image.embed_orientations` 1), for
    tests of plumbing: the default mean over the crop's eight orientations costs about 3x the
    embedding time, and tests/test_model_dihedral.py and test_embed.py test it on its own."""
    config = load_config(name)
    config.image.embed_orientations = 1
    return config


def copy_bundle(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    """Copy a bundle's files except `skip` (tests modify the copy, never the original)."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name in skip:
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name)
        else:
            shutil.copyfile(item, target / item.name)
    return target


def decoded_records(root: Path, level: str) -> dict[str, dict]:
    """Every record of a MIST level store, decoded, by key."""
    env = lmdb.open(str(root / f"{level}.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        out = {k.decode(): decode_record(v) for k, v in txn.cursor()}
    env.close()
    return out


def write_pyramid(
    path: Path,
    levels: list[np.ndarray],
    *,
    axes: str = "YX",
    tile: int = 64,
    channel_names: list[str] | None = None,
    pixel_size_um: float | None = 0.2125,
    compression: str = "zlib",
    photometric: str | None = None,
) -> Path:
    """An OME-TIFF whose level 0 is in the main IFD and lower levels are SubIFDs (as Xenium writes)."""
    metadata: dict = {"axes": axes}
    if pixel_size_um is not None:
        metadata.update(PhysicalSizeX=pixel_size_um, PhysicalSizeY=pixel_size_um)
    if channel_names is not None:
        metadata["Channel"] = {"Name": channel_names}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            levels[0],
            tile=(tile, tile),
            subifds=len(levels) - 1,
            compression=compression,
            photometric=photometric,
            metadata=metadata,
        )
        for level in levels[1:]:
            tw.write(level, tile=(tile, tile), subfiletype=1, compression=compression, photometric=photometric)
    return path


def write_10x_h5(path: Path, counts: sp.spmatrix, barcodes, ids, names, types) -> None:
    """A 10x HDF5 feature matrix: CSC of features x cells (= CSR of cells x features)."""
    csr = sp.csr_matrix(counts)
    with h5py.File(path, "w") as h5:
        group = h5.create_group("matrix")
        group["barcodes"] = np.asarray(barcodes, dtype="S")
        group["data"] = csr.data.astype(np.int32)
        group["indices"] = csr.indices.astype(np.int64)
        group["indptr"] = csr.indptr.astype(np.int64)
        group["shape"] = np.array([csr.shape[1], csr.shape[0]], dtype=np.int32)
        features = group.create_group("features")
        features["id"] = np.asarray(ids, dtype="S")
        features["name"] = np.asarray(names, dtype="S")
        features["feature_type"] = np.asarray(types, dtype="S")
        features["genome"] = np.asarray(["GRCh38"] * len(ids), dtype="S")


class Interrupted(Exception):
    """Raised by `StopAtStep` to simulate a killed training run."""


def stop_at_step(step: int):
    """A Lightning callback raising `Interrupted` before training step `step` (after the
    checkpoint of the step before was saved)."""
    import lightning as L

    class StopAtStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == step:
                raise Interrupted()

    return StopAtStep()
