"""Fraud-image checks (issue 5): duplicate photos across sellers, contact details drawn on
images, NSFW, tampering, category mismatch, low quality; the reviewers' flag queue and the
per-listing fraud score. See docs/fraud.md."""
