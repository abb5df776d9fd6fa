"""scVI's latent space as a baseline, through scvi-tools when it is installed (optional extra).

`pip install 'spatia[scvi]'` installs scvi-tools (measured: 18 packages, ~14 MB of wheels,
~94 MB installed, torch unchanged). Without it, `scvi_latent` raises `ScviUnavailable` with
the reason, and the evaluation reports the baseline as skipped.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

INSTALL_HINT = "pip install 'spatia[scvi]'"

log = logging.getLogger(__name__)


class ScviUnavailable(RuntimeError):
    """scvi-tools cannot be imported; the message says why and how to install it."""


@dataclass
class ScviFit:
    embedding: np.ndarray  # (N, n_latent) float32
    seconds: float
    version: str


def scvi_available() -> tuple[bool, str]:
    """(True, version) when scvi-tools imports, else (False, reason)."""
    try:
        import scvi
    except ImportError as error:
        return False, f"scvi-tools is not installed ({error}); install it with {INSTALL_HINT}"
    except Exception as error:  # noqa: BLE001 - a broken install raises many kinds
        return False, f"scvi-tools failed to import ({type(error).__name__}: {error})"
    return True, str(scvi.__version__)


def scvi_latent(counts: sp.spmatrix | np.ndarray, *, n_latent: int = 10, epochs: int = 40, seed: int = 0,
                n_threads: int = 1, fit_rows: np.ndarray | None = None) -> ScviFit:
    """Train scVI (scvi-tools' default model: 1 hidden layer of 128, ZINB likelihood, per-gene
    dispersion) on raw counts (N, G) for `epochs` on CPU; return the latent mean of every cell.
    `fit_rows` (bool (N,)): train on these cells only (None: every cell); all N are embedded.

    Global random states (python, numpy, torch) are restored afterwards.
    """
    ok, detail = scvi_available()
    if not ok:
        raise ScviUnavailable(detail)
    import anndata as ad
    import scvi
    import torch

    counts = sp.csr_matrix(counts, dtype=np.float32)
    holder = ad.AnnData(X=counts, obs=pd.DataFrame(index=[str(i) for i in range(counts.shape[0])]),
                        var=pd.DataFrame(index=[f"g{j}" for j in range(counts.shape[1])]))
    train = holder if fit_rows is None else holder[np.flatnonzero(fit_rows)].copy()
    py_state, np_state = random.getstate(), np.random.get_state()
    previous_threads = torch.get_num_threads()
    # scvi-tools and Lightning log every epoch at INFO: quiet them for the fit, then give the
    # caller's process its logging back as it was
    quieted = [logging.getLogger(name) for name in ("scvi", "lightning", "lightning.pytorch", "lightning.fabric",
                                                    "lightning.fabric.utilities.seed")]
    previous_levels = [logger.level for logger in quieted]
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for logger in quieted:
                logger.setLevel(logging.WARNING)
            scvi.settings.seed = seed
            torch.set_num_threads(max(1, n_threads))
            scvi.model.SCVI.setup_anndata(train)
            model = scvi.model.SCVI(train, n_latent=n_latent)
            model.train(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                        enable_model_summary=False, logger=False, enable_checkpointing=False)
            # every cell through the trained encoder (scvi-tools transfers the train setup to it)
            embedding = np.asarray(model.get_latent_representation(None if fit_rows is None else holder),
                                   dtype=np.float32)
    finally:
        for logger, level in zip(quieted, previous_levels):
            logger.setLevel(level)
        torch.set_num_threads(previous_threads)
        random.setstate(py_state)
        np.random.set_state(np_state)
    return ScviFit(embedding, time.perf_counter() - t0, detail)
