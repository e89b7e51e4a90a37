"""Observability: structured logs (``logs``), Prometheus metrics (``metrics``) and quiet
progress output off a terminal (``progress``).

A leaf-ish layer: it imports only ``worker.config`` from this project (never ``db`` or
``worker.pipeline``), so every layer may call its one-line hooks with plain values.
"""
