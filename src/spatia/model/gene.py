"""Gene encoder, scPRINT-style: one token per gene, a transformer over the tokens.

A token is `gene-ID embedding + value encoding` of the gene's normalised expression. Only genes
the slide measured can become tokens (the panel mask); per cell, all nonzero measured genes (up
to `gene.max_tokens`) are taken plus randomly chosen measured zeros up to the cap, as scPRINT
does, so the transformer length is fixed by the config rather than by the panel.

The encoder's input is the normalised expression `log1p(counts / total * target_sum)`, with
`total` summed over *measured* genes only, so unmeasured genes cannot affect anything. Two
statistics are measured from the data when pretraining starts (`spatia.train.data`): the token
cap `gene.max_tokens` (the 99th percentile of nonzero measured genes per train cell), so nearly
every cell gets every one of its nonzero genes as a token, and `gene.target_sum` (the median
library of the train cells, scanpy's default), so a single count maps to about log1p(1) rather
than to log1p(10,000 / library) ~ 7 on Xenium's 5-100-count cells (docs/model.md).

Gene-ID embeddings may start from a user table of gene vectors (e.g. protein language model
embeddings), matched by symbol: see `read_gene_table` and `match_gene_vectors`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spatia.errors import InputDataError
from spatia.model.config import GeneConfig
from spatia.model.layers import SelfAttentionBlock

log = logging.getLogger(__name__)


def normalize_counts(counts: torch.Tensor, measured: torch.Tensor, target_sum: float) -> torch.Tensor:
    """`log1p(counts / total * target_sum)` over measured genes; 0 for unmeasured genes.

    counts float32 `(N, G)` raw counts; measured bool `(N, G)`. Rows with no counts give 0.
    """
    counts = torch.where(measured, counts, torch.zeros((), dtype=counts.dtype, device=counts.device))
    total = counts.sum(dim=1, keepdim=True)
    scale = torch.where(total > 0, target_sum / total.clamp(min=1e-12), torch.zeros_like(total))
    return torch.log1p(counts * scale)


@dataclass
class GeneSelection:
    """Chosen genes per row, left-aligned: `index` int64 `(N, W)` vocabulary rows (0 where
    padding) and `valid` bool `(N, W)` (True = a real gene)."""

    index: torch.Tensor
    valid: torch.Tensor

    def take(self, values: torch.Tensor) -> torch.Tensor:
        """Gather `(N, G)` per-gene values at the selection: `(N, W)`, 0 at padding."""
        out = torch.gather(values, 1, self.index)
        return out.masked_fill(~self.valid, 0.0)


def _compact(index: torch.Tensor, flag: torch.Tensor) -> GeneSelection:
    """Move the flagged entries of each row to the front; width = the largest flagged count."""
    order = torch.argsort((~flag).to(torch.uint8), dim=1, stable=True)
    width = int(flag.sum(dim=1).max()) if flag.numel() else 0
    order = order[:, :width]
    return GeneSelection(torch.gather(index, 1, order), torch.gather(flag, 1, order))


def select_genes(values: torch.Tensor, measured: torch.Tensor, cap: int | None, *, randomize: bool,
                 zero_priority: torch.Tensor, generator: torch.Generator | None = None) -> GeneSelection:
    """Choose up to `cap` measured genes per row: nonzero ones first, then zeros.

    values float32 `(N, G)` normalised expression; measured bool `(N, G)`. With `randomize`,
    nonzero genes (when more than `cap`) and the zeros filling the rest are drawn uniformly at
    random; without it the choice is deterministic: highest expression first, then zeros in the
    fixed order `zero_priority` (float `(G,)` in [0, 1)). Unmeasured genes are never chosen.
    `cap` None: every measured gene.
    """
    nonzero = (values > 0) & measured
    if randomize:
        u = torch.rand(values.shape, device=values.device, generator=generator)
        score = u + nonzero.float()
    else:
        score = torch.where(nonzero, values / (1.0 + values), zero_priority.expand_as(values)) + nonzero.float()
    score = score.masked_fill(~measured, -1.0)
    k = values.shape[1] if cap is None else min(cap, values.shape[1])
    top, index = score.topk(k, dim=1, sorted=True)
    return _compact(index, top >= 0)


def split_masked(selection: GeneSelection, mask_ratio: float, *, withhold: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[GeneSelection, GeneSelection]:
    """Split each row's genes into (kept, masked) for masked gene modelling.

    `round(mask_ratio * n)` of a row's n genes, chosen uniformly, are masked: they are left out
    of the encoder and become the reconstruction targets. `mask_ratio` 1.0 masks all (used when
    the gene modality is withheld); 0.0 masks none. `withhold` bool `(N,)`: rows whose genes
    are all masked (image-only training cells).
    """
    valid = selection.valid
    n_valid = valid.sum(dim=1, keepdim=True)
    n_mask = torch.floor(mask_ratio * n_valid.float() + 0.5).long()
    if mask_ratio <= 0.0:
        masked = torch.zeros_like(valid)
    elif mask_ratio >= 1.0:
        masked = valid.clone()
    else:
        u = torch.rand(valid.shape, device=valid.device, generator=generator).masked_fill(~valid, 2.0)
        rank = u.argsort(dim=1).argsort(dim=1)
        masked = valid & (rank < n_mask)
    if withhold is not None:
        masked = masked | (valid & withhold[:, None])
    kept = valid & ~masked
    return _compact(selection.index, kept), _compact(selection.index, masked)


class ContinuousValueEncoder(nn.Module):
    """scPRINT's value encoder: clip -> Linear(1, d) -> ReLU -> Linear(d, d) -> LayerNorm -> dropout."""

    def __init__(self, dim: int, dropout: float, max_value: float):
        super().__init__()
        self.max_value = max_value
        self.linear1 = nn.Linear(1, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = values.clamp(max=self.max_value).unsqueeze(-1)
        return self.dropout(self.norm(self.linear2(torch.relu(self.linear1(x)))))


@dataclass
class GeneEncoding:
    """What `GeneEncoder` returns.

    tokens float `(N, L, gene.dim)` contextual tokens and their validity bool `(N, L)`; profile
    float `(N, gene.dim)`: `Linear(G, dim)` of the cell's visible profile *before* attention (0
    for a cell without gene tokens), None without `gene.profile_token`."""

    tokens: torch.Tensor
    valid: torch.Tensor
    profile: torch.Tensor | None


class GeneEncoder(nn.Module):
    """Gene tokens -> contextual gene tokens and the profile embedding (`GeneEncoding`).

    forward(index, values, valid) with index int64 `(N, W)` vocabulary rows, values float32
    `(N, W)` normalised expression, valid bool `(N, W)`. Tokens: L = W, or W + 1 with
    `gene.profile_token`: a first token, the profile embedding `Linear(G, dim)` of the cell's
    token values scattered into the vocabulary (an autoencoder-style summary of the whole visible
    profile, valid when the cell has a token), precedes the gene tokens and joins their
    attention. It sees only the genes given, so masked genes stay hidden. The profile embedding
    is also returned as it was before attention: a linear read of the profile that the zero
    tokens (a random draw in training, a fixed one at embedding) cannot perturb; the gene
    residual of z_cell takes it from there (`fusion.gene_residual`, docs/model.md).
    """

    def __init__(self, cfg: GeneConfig, n_genes: int):
        super().__init__()
        self.dim = cfg.dim
        self.embedding = nn.Embedding(n_genes, cfg.dim)
        self.value_encoder = ContinuousValueEncoder(cfg.dim, cfg.dropout, cfg.max_value)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(cfg.dim, cfg.heads, cfg.mlp_size, cfg.dropout) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.n_genes = n_genes
        self.profile = nn.Linear(n_genes, cfg.dim) if cfg.profile_token else None
        # fixed random order in which measured zeros are taken when selection is deterministic
        priority = torch.rand(n_genes, generator=torch.Generator().manual_seed(0))
        self.register_buffer("zero_priority", priority)
        if cfg.freeze_embeddings:
            self.embedding.weight.requires_grad_(False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding.weight, std=1.0)

    def forward(self, index: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> GeneEncoding:
        x = self.embedding(index) + self.value_encoder(values)
        embedded = None
        if self.profile is not None:
            profile = torch.zeros(index.shape[0], self.n_genes, dtype=values.dtype, device=values.device)
            profile = profile.scatter_add(1, index, values.masked_fill(~valid, 0.0).clamp(max=self.value_encoder.max_value))
            has_genes = valid.any(dim=1, keepdim=True)
            embedded = self.profile(profile) * has_genes.to(values.dtype)
            x = torch.cat([embedded[:, None, :].to(x.dtype), x], dim=1)
            valid = torch.cat([has_genes, valid], dim=1)
        if x.shape[1] == 0:
            return GeneEncoding(x, valid, embedded)
        # a row without genes attends to its (ignored) padding instead of nothing, avoiding NaN
        attend = valid | ~valid.any(dim=1, keepdim=True)
        for block in self.blocks:
            x = block(x, attend)
        return GeneEncoding(self.norm(x), valid, embedded)

    @torch.no_grad()
    def load_gene_vectors(self, vocabulary: list[str], table_symbols: list[str], vectors: np.ndarray,
                          *, source: str | Path = "<table>") -> dict:
        """Initialise gene-ID embeddings from a symbol -> vector table (see `match_gene_vectors`)."""
        rows, found, report = match_gene_vectors(vocabulary, table_symbols, vectors, self.dim, source=source)
        weight = self.embedding.weight
        found_t = torch.from_numpy(found).to(weight.device)
        weight[found_t] = torch.from_numpy(rows[found]).to(weight)
        return report


# --------------------------------------------------------------------------------------------
# gene vector tables
# --------------------------------------------------------------------------------------------

_SYMBOL_COLUMNS = ("symbol", "gene_symbol", "gene", "gene_name", "feature_name", "name")


def read_gene_table(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a gene-vector table: symbols and a float32 `(n, d)` matrix.

    Formats, by suffix:
    - `.tsv` / `.txt` (tab) and `.csv` (comma): first column the gene symbol, the rest numbers;
      an optional header row is detected (its number columns are not numeric);
    - `.parquet`: the symbol from a column named symbol / gene_symbol / gene / gene_name /
      feature_name / name, else from a string index; vectors from the numeric columns, or from
      one column holding a list per row.
    Duplicate symbols and missing or non-numeric values raise `InputDataError`.
    """
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputDataError("gene-embedding table not found", path=path,
                             fix="give an existing .tsv, .csv or .parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".txt", ".csv"):
            raw = pd.read_csv(path, sep="," if suffix == ".csv" else "\t", header=None, dtype=str,
                              keep_default_na=False)
            if raw.shape[1] < 2:
                raise InputDataError("the table needs a symbol column and at least one number column",
                                     path=path, fix="write 'SYMBOL<tab>v1<tab>v2...' per line")
            numbers = raw.iloc[:, 1:].apply(pd.to_numeric, errors="coerce")
            if len(raw) > 1 and numbers.iloc[0].isna().all():
                raw, numbers = raw.iloc[1:], numbers.iloc[1:]  # header row
            symbols = raw.iloc[:, 0].astype(str).str.strip().tolist()
            bad = numbers.isna().any(axis=1).to_numpy()
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                raise InputDataError(f"row for '{symbols[first]}' has a missing or non-numeric value",
                                     path=path, fix="every row needs the same count of numbers")
            vectors = numbers.to_numpy(dtype=np.float32)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
            column = next((c for c in _SYMBOL_COLUMNS if c in frame.columns), None)
            if column is not None:
                symbols = frame[column].astype(str).str.strip().tolist()
                frame = frame.drop(columns=[column])
            elif frame.index.dtype == object:
                symbols = [str(s).strip() for s in frame.index]
            else:
                raise InputDataError("no gene symbol column", path=path,
                                     fix=f"name the symbol column one of: {', '.join(_SYMBOL_COLUMNS)}")
            numeric = frame.select_dtypes(include="number")
            if numeric.shape[1] == 0 and frame.shape[1] == 1:
                vectors = np.stack([np.asarray(v, dtype=np.float32) for v in frame.iloc[:, 0]])
            elif numeric.shape[1] > 0:
                vectors = numeric.to_numpy(dtype=np.float32)
            else:
                raise InputDataError("no numeric vector columns", path=path,
                                     fix="store one number per column, or one list column")
        else:
            raise InputDataError(f"unsupported table format '{suffix}'", path=path,
                                 fix="use .tsv, .txt, .csv or .parquet")
    except InputDataError:
        raise
    except Exception as error:
        raise InputDataError(f"cannot read the gene-embedding table ({error})", path=path,
                             fix="check the file format") from None
    if vectors.ndim != 2 or len(vectors) == 0:
        raise InputDataError("the table holds no vectors", path=path, fix="give a non-empty table")
    if not np.isfinite(vectors).all():
        raise InputDataError("the table holds NaN or infinite values", path=path,
                             fix="remove or repair those rows")
    seen: set[str] = set()
    duplicates = sorted({s for s in symbols if s in seen or seen.add(s)})
    if duplicates:
        raise InputDataError(f"duplicate symbols, e.g. {', '.join(duplicates[:5])}", path=path,
                             fix="keep one vector per gene symbol")
    return symbols, vectors


def match_gene_vectors(vocabulary: list[str], table_symbols: list[str], vectors: np.ndarray, dim: int,
                       *, source: str | Path = "<table>") -> tuple[np.ndarray, np.ndarray, dict]:
    """Map table vectors onto the vocabulary. Returns rows `(G, dim)`, found bool `(G,)`, report.

    Rules (stated in docs/model.md):
    - a vocabulary symbol takes the row with the identical symbol; failing that, the row whose
      symbol matches ignoring case, when exactly one does;
    - vocabulary genes with no row keep their random initialisation (N(0, 1));
      table rows for genes outside the vocabulary are ignored;
    - if the table's width differs from `dim`, it is projected to `dim` by PCA over all table
      rows (zero-padded when the table has fewer components than `dim`);
    - the vectors are then scaled to unit standard deviation over all entries, the scale of the
      random initialisation.
    No vocabulary gene found at all raises `InputDataError` (wrong species or symbol type).
    """
    exact = {s: i for i, s in enumerate(table_symbols)}
    upper: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i, s in enumerate(table_symbols):
        key = s.upper()
        if key in upper:
            ambiguous.add(key)
        upper[key] = i
    source_rows = np.full(len(vocabulary), -1, dtype=np.int64)
    n_case = 0
    for g, symbol in enumerate(vocabulary):
        if symbol in exact:
            source_rows[g] = exact[symbol]
        elif symbol.upper() in upper and symbol.upper() not in ambiguous:
            source_rows[g] = upper[symbol.upper()]
            n_case += 1
    found = source_rows >= 0
    if not found.any():
        raise InputDataError(
            f"none of the {len(vocabulary)} vocabulary genes (e.g. {', '.join(vocabulary[:3])}) "
            "is in the gene-embedding table",
            path=source, fix="give a table keyed by the same gene symbols as the dataset (HGNC symbols)")
    table = vectors.astype(np.float64)
    projected = table.shape[1] != dim
    if projected:
        centred = table - table.mean(axis=0, keepdims=True)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        k = min(dim, vt.shape[0])
        table = np.zeros((len(table), dim))
        table[:, :k] = centred @ vt[:k].T
    std = table.std()
    table = table / std if std > 0 else table
    rows = np.zeros((len(vocabulary), dim), dtype=np.float32)
    rows[found] = table[source_rows[found]]
    report = {
        "source": str(source), "vocabulary": len(vocabulary), "table_rows": len(table_symbols),
        "found": int(found.sum()), "found_ignoring_case": n_case,
        "missing": int((~found).sum()), "projected_from": int(vectors.shape[1]) if projected else None,
    }
    log.info("gene vectors: %d of %d vocabulary genes found in %s (%d by case-insensitive match)",
             report["found"], report["vocabulary"], source, n_case)
    return rows, found, report
