"""The review service: HTTP API (OpenAPI), reviewers' web pages and accounts (``catalog api``)."""
