"""Tables owned by the fraud checks (filled in by the fraud module)."""
