"""spatia: multi-scale cell representations from imaging-based spatial transcriptomics.

The notebook API (everything below is imported on first use, so `import spatia` stays cheap and
never imports torch, Lightning or scanpy):

- `spatia.read_xenium(path)`: a Xenium output folder as a `XeniumSlide` (`.to_anndata()`,
  `.to_spatialdata()`); `spatia.read_spatialdata(sdata_or_zarr)` the reverse (optional extra).
- the pipeline stages of `spatia.stages`, each writing its outputs and a run record:
  `spatia.simulate`, `spatia.build`, `spatia.pretrain`, `spatia.embed`, `spatia.pair`, and
  `spatia.stages.evaluate` (`spatia.evaluate` is the evaluation package).
- `spatia.tl`: AnnData-first tools (`spatia.tl.embed(adata, checkpoint, dataset=...)` writes
  obsm["X_spatia"]; `spatia.tl.concatenate_levels(adata, "cell+niche")` the levels side by side).
- `spatia.pl`: plots on matplotlib Axes (clusters of an embedding over the tissue, pairs over
  the tissue, top signature genes of a transition).
"""

from importlib import import_module

from spatia.errors import SpatiaError

# public name -> (module, attribute); attribute None: the module itself
_LAZY = {
    "read_xenium": ("spatia.io.xenium", "read_xenium"),
    "read_spatialdata": ("spatia.io.spatialdata", "read_spatialdata"),
    "stages": ("spatia.stages", None),
    "simulate": ("spatia.stages", "simulate"),
    "build": ("spatia.stages", "build"),
    "pretrain": ("spatia.stages", "pretrain"),
    "embed": ("spatia.stages", "embed"),
    "pair": ("spatia.stages", "pair"),
    "tl": ("spatia.tl", None),
    "pl": ("spatia.pl", None),
}

__all__ = [
    "SpatiaError",
    "__version__",
    "build",
    "embed",
    "pair",
    "pl",
    "pretrain",
    "read_spatialdata",
    "read_xenium",
    "simulate",
    "stages",
    "tl",
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # ~0.1 s: only when asked

    try:
        return version("spatia")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        globals()[name] = value = _version()
        return value
    if name not in _LAZY:
        raise AttributeError(f"module 'spatia' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})
