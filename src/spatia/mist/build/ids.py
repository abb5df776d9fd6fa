"""Record keys and IDs of a MIST dataset (cells, niches, tissue regions) and build chunks."""

from __future__ import annotations


def cell_key(slide_id: str, cell_id: str) -> str:
    """LMDB key of a cell record."""
    return f"{slide_id}/cell/{cell_id}"


def niche_id(slide_id: str, row: int, col: int) -> str:
    """ID (and LMDB key) of the niche at global grid position (row, col) of a slide."""
    return f"{slide_id}/niche/r{row}_c{col}"


def tissue_id(slide_id: str, row: int, col: int) -> str:
    """ID (and LMDB key) of the tissue region at grid position (row, col) of a slide."""
    return f"{slide_id}/tissue/r{row}_c{col}"


def chunk_key(slide_index: int, tr: int, tc: int) -> str:
    return f"s{slide_index}/t{tr}_{tc}"
