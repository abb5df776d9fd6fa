"""spatia: multi-scale cell representations from imaging-based spatial transcriptomics."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spatia")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from spatia.errors import SpatiaError

__all__ = ["SpatiaError", "__version__"]
