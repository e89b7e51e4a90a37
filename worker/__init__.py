"""catalog-worker: event-driven image worker for e-commerce catalogs."""

from importlib.metadata import PackageNotFoundError, version

try:
    # pyproject.toml is the one place the version is written; the installed metadata carries it.
    __version__ = version("catalog-worker")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
