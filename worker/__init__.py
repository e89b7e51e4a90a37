"""catalog-worker: event-driven image worker for e-commerce catalogs."""

__version__ = "0.1.0"
