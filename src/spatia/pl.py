"""Plots for notebooks: matplotlib only, each drawing on an Axes (a new figure when `ax` is None)
and returning it.

- `spatial_clusters(adata, basis)`: Leiden clusters of an embedding drawn at the cells'
  positions on the tissue (obsm["spatial"], um).
- `pairs(pairs, adata)`: control -> target segments of `spatia pair` over the tissue.
- `signature_genes(signatures, transition)`: the genes whose mean expression rises (or falls)
  most from control to target (Delta g, paper Eq. 11).

Coordinates follow the Xenium convention (docs/io.md): x to the right, y down, in um.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spatia.errors import InputDataError
from spatia.keys import SPATIAL_KEY, X_SPATIA

if TYPE_CHECKING:
    import anndata
    import pandas as pd
    from matplotlib.axes import Axes

    from spatia.perturb.signatures import Signatures

NOT_EMBEDDED_COLOUR = "#d0d0d0"


def spatial_clusters(adata: anndata.AnnData, basis: str = X_SPATIA, resolution: float = 1.0,
                     ax: Axes | None = None, *, n_neighbors: int = 15, max_dim: int = 50, seed: int = 0,
                     point_size: float | None = None) -> Axes:
    """Leiden clusters of `obsm[basis]` drawn over `obsm["spatial"]`, with a legend.

    The clustering is the evaluation's (`spatia.evaluate.leiden`: a euclidean kNN graph of
    `n_neighbors` on the first `max_dim` principal components, igraph's Leiden, modularity with
    `resolution`, seeded). Cells whose embedding has NaN rows (not embedded, see
    `spatia.tl.embed`) are drawn in grey.
    """
    from spatia.evaluate.leiden import LeidenGraph, cluster_space, knn_adjacency

    embedding = _obsm(adata, basis)
    xy_um = _spatial(adata)
    ok = np.isfinite(embedding).all(axis=1)
    if ok.sum() < 3:
        raise InputDataError(f"obsm[{basis!r}] has {int(ok.sum())} cells without NaN; Leiden needs at least 3",
                             fix="embed the cells first (spatia.tl.embed)")
    space = cluster_space(embedding[ok].astype(np.float32), max_dim, seed)
    labels = LeidenGraph(knn_adjacency(space, n_neighbors)).leiden(resolution, seed)
    by_size = np.argsort(-np.bincount(labels), kind="stable")  # cluster 0 the largest, as scanpy numbers them
    labels = np.argsort(by_size)[labels]

    ax = _axes(ax, figsize=(7.5, 6))
    size = point_size if point_size is not None else _point_size(adata.n_obs)
    if not ok.all():
        ax.scatter(*xy_um[~ok].T, s=size, c=NOT_EMBEDDED_COLOUR, linewidths=0,
                   label=f"not embedded ({int((~ok).sum())})")
    colours = _palette(int(labels.max()) + 1)
    ids, counts = np.unique(labels, return_counts=True)
    for cluster, count in zip(ids, counts):
        ax.scatter(*xy_um[ok][labels == cluster].T, s=size, color=colours[cluster], linewidths=0,
                   label=f"{cluster} ({count})")
    ax.set_title(f"Leiden clusters of {basis} (resolution {resolution:g}, {len(ids)} clusters)")
    _tissue_axes(ax)
    ax.legend(title="cluster (cells)", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, markerscale=3,
              ncol=1 if len(ids) <= 20 else 2, frameon=False)
    return ax


def pairs(pairs_df_or_dir: pd.DataFrame | str | Path, adata: anndata.AnnData, transition: str | None = None,
          ax: Axes | None = None, *, max_pairs: int = 2000, seed: int = 0, point_size: float | None = None,
          colours: Mapping[str, Any] | None = None, title: str | None = None) -> Axes:
    """Control -> target pairs of `spatia pair` over the tissue.

    Every cell of `adata` is a light-grey dot; every paired control (circle) and target
    (triangle) is coloured by its transition; a segment joins each control to its target for at
    most `max_pairs` pairs per transition (a seeded random subset, said in the legend), so dense
    pairings stay readable.

    Args:
        pairs_df_or_dir: the pairs table, a `spatia pair` output folder or its pairs.parquet.
        adata: the AnnData that was paired (obs_names = the pairs' x_ctrl_id / x_tgt_id,
            obsm["spatial"] in um).
        transition: one transition_tag to draw; None draws every transition in its own colour.
        colours: transition_tag -> matplotlib colour (default: tab10/tab20 in order of appearance),
            so that several maps (one per slide) share colours.
        title: the axes title (default: "control -> target pairs").
    """
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    table = _read_pairs(pairs_df_or_dir)
    if transition is not None:
        known = sorted(table["transition_tag"].astype(str).unique())
        if transition not in known:
            raise InputDataError(f"no pairs of transition {transition!r}", fix=f"use one of {known}")
        table = table[table["transition_tag"].astype(str) == transition]
    xy_um = _spatial(adata)
    names = adata.obs_names
    ctrl = names.get_indexer(table["x_ctrl_id"].astype(str))
    tgt = names.get_indexer(table["x_tgt_id"].astype(str))
    found = (ctrl >= 0) & (tgt >= 0)
    if not found.any():
        raise InputDataError(f"none of the {len(table)} pairs' cells are cells of the AnnData "
                             f"(pairs name cells like {list(table['x_ctrl_id'].astype(str)[:2])}, "
                             f"the AnnData like {list(names[:2])})",
                             fix="give the AnnData that was paired (the cells file of `spatia pair`)")

    ax = _axes(ax, figsize=(7.5, 6))
    size = point_size if point_size is not None else _point_size(adata.n_obs)
    ax.scatter(*xy_um.T, s=size, c=NOT_EMBEDDED_COLOUR, linewidths=0)
    tags = table["transition_tag"].astype(str).to_numpy()
    kinds = list(dict.fromkeys(tags[found]))
    if colours is None:
        colours = dict(zip(kinds, _palette(len(kinds))))
    rng = np.random.default_rng(seed)
    handles = [Line2D([], [], color=NOT_EMBEDDED_COLOUR, marker="o", linestyle="", label=f"cells ({adata.n_obs})")]
    for tag in kinds:
        colour = colours[tag]
        rows = np.flatnonzero(found & (tags == tag))
        shown = np.sort(rng.choice(rows, size=max_pairs, replace=False)) if len(rows) > max_pairs else rows
        ax.scatter(*xy_um[np.unique(ctrl[rows])].T, s=2 * size + 1, color=colour, marker="o", linewidths=0)
        ax.scatter(*xy_um[np.unique(tgt[rows])].T, s=3 * size + 2, color=colour, marker="^", linewidths=0)
        start, end = xy_um[ctrl[shown]], xy_um[tgt[shown]]
        ax.add_collection(LineCollection(np.stack([start, end], axis=1), colors=[colour], linewidths=0.9,
                                         alpha=0.9))
        shown_text = f"{len(rows)} pairs" if len(shown) == len(rows) else f"{len(rows)} pairs, {len(shown)} drawn"
        handles.append(Line2D([], [], color=colour, label=f"{tag} ({shown_text})"))
    handles += [Line2D([], [], color="black", marker="o", linestyle="", markersize=4, label="control cell"),
                Line2D([], [], color="black", marker="^", linestyle="", markersize=5, label="target cell"),
                Line2D([], [], color="black", linewidth=0.8, label="control -> its target")]
    if title is None:
        title = "control -> target pairs" if transition is None else f"{transition}: control -> target pairs"
    ax.set_title(title)
    _tissue_axes(ax)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return ax


UP_COLOUR, DOWN_COLOUR = "#c0392b", "#2e86c1"


def signature_genes(signatures_dir: Signatures | str | Path, transition: str | None = None, n: int = 10,
                    ax: Axes | None = None, *, direction: str = "up") -> Axes:
    """Horizontal bars of the top signature genes of one transition, by Delta g = mean
    log-expression of the targets - that of their controls (paper Eq. 11).

    direction: "up" = the `n` genes with the largest positive Delta g, "down" = the `n` most
    negative, "both" = both lists (up above, down below). Genes whose Delta g has the other
    sign are never listed, so a list can be shorter than `n`.

    Args:
        signatures_dir: a `spatia pair` output folder, its signatures.npz, or a `Signatures`.
        transition: the transition_tag; None when the folder holds one transition.
    """
    from matplotlib.patches import Patch

    signatures = _signatures(signatures_dir)
    if transition is None:
        if len(signatures.transitions) != 1:
            raise InputDataError(f"the signatures hold {len(signatures.transitions)} transitions",
                                 fix=f"choose one: transition= one of {signatures.transitions}")
        transition = signatures.transitions[0]
    if transition not in signatures.transitions:
        raise InputDataError(f"no signature of transition {transition!r}", fix=f"use one of {signatures.transitions}")
    if direction not in ("up", "down", "both"):
        raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")
    t = signatures.transitions.index(transition)
    row = dict(zip(signatures.genes, signatures.delta[t]))
    genes = []
    if direction in ("up", "both"):
        genes += [g for g in signatures.top_genes(transition, n, direction="up") if row[g] > 0]
    if direction in ("down", "both"):
        down = [g for g in signatures.top_genes(transition, n, direction="down") if row[g] < 0]
        genes += down[::-1] if direction == "both" else down  # "both": the most negative at the bottom
    delta = np.array([row[g] for g in genes], dtype=np.float64)

    ax = _axes(ax, figsize=(5.5, 0.3 * len(genes) + 1.6))
    positions = np.arange(len(genes))[::-1]  # the first listed at the top
    ax.barh(positions, delta, color=np.where(delta >= 0, UP_COLOUR, DOWN_COLOUR))
    ax.set_yticks(positions, genes)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("Delta g (mean log-expression, target - control)")
    ax.set_ylabel("gene")
    ax.set_title(f"{transition}: top signature genes ({int(signatures.n_pairs[t])} pairs)" if direction == "both"
                 else f"{transition}: top {len(genes)} signature genes ({direction}, "
                      f"{int(signatures.n_pairs[t])} pairs)")
    ax.legend(handles=[Patch(color=UP_COLOUR, label="higher in target"),
                       Patch(color=DOWN_COLOUR, label="higher in control")], fontsize=7, loc="lower right")
    if not genes:
        ax.text(0.5, 0.5, "no gene changes", transform=ax.transAxes, ha="center", va="center")
    return ax


# --- helpers -----------------------------------------------------------------------------------


def _axes(ax, figsize):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _obsm(adata, key: str) -> np.ndarray:
    if key not in adata.obsm:
        raise InputDataError(f"the AnnData has no obsm[{key!r}] (obsm keys: {sorted(adata.obsm.keys())})",
                             fix="embed the cells first (spatia.tl.embed) or choose an existing key")
    return np.asarray(adata.obsm[key], dtype=np.float64)


def _spatial(adata) -> np.ndarray:
    xy_um = _obsm(adata, SPATIAL_KEY)
    if xy_um.ndim != 2 or xy_um.shape[1] < 2:
        raise InputDataError(f"obsm[{SPATIAL_KEY!r}] has shape {xy_um.shape}, not (cells, 2)",
                             fix="store the cell centroids (x_um, y_um) there, as read_xenium does")
    return xy_um[:, :2]


def _point_size(n_cells: int) -> float:
    """Marker area (pt^2) that keeps 1k to 100k cells readable on a 7-inch map."""
    return float(np.clip(30_000 / max(n_cells, 1), 0.3, 20.0))


def _palette(n: int) -> list:
    import matplotlib

    base = matplotlib.colormaps["tab20"].colors if n > 10 else matplotlib.colormaps["tab10"].colors
    return [base[i % len(base)] for i in range(n)]


def _tissue_axes(ax) -> None:
    ax.set_xlabel("x (um)")
    ax.set_ylabel("y (um)")
    ax.set_aspect("equal")
    ax.autoscale_view()
    if not ax.yaxis_inverted():
        ax.invert_yaxis()  # image convention: y grows downwards


def _read_pairs(source) -> pd.DataFrame:
    import pandas as pd

    if isinstance(source, pd.DataFrame):
        table = source
    else:
        from spatia.perturb.pairing import PAIRS_FILE

        path = Path(source)
        path = path / PAIRS_FILE if path.is_dir() else path
        if not path.is_file():
            raise InputDataError("no pairs table", path=path, fix="give a `spatia pair` output folder or its pairs.parquet")
        table = pd.read_parquet(path)
    missing = [c for c in ("x_ctrl_id", "x_tgt_id", "transition_tag") if c not in table.columns]
    if missing:
        raise InputDataError(f"the pairs table lacks columns {missing}", fix="give the pairs written by `spatia pair`")
    return table


def _signatures(source) -> Signatures:
    from spatia.perturb.signatures import Signatures

    return source if isinstance(source, Signatures) else _read_signatures(source)


def _read_signatures(source) -> Signatures:
    from spatia.perturb.signatures import Signatures

    path = Path(source)
    path = path / "signatures.npz" if path.is_dir() else path
    if not path.is_file():
        raise InputDataError("no signatures file", path=path,
                             fix="give a `spatia pair` output folder or its signatures.npz")
    return Signatures.read_npz(path)
