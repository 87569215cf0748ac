"""biogen: compound library precompute, similarity search, protein embedding and screening."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("biogen")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
