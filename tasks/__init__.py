"""Thin Celery task definitions: each calls into worker/ and db/ and owns no logic."""
