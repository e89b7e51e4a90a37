"""Outbound events: telling the shop that a listing is done (``listing.processed``).

A transactional outbox. The code that finishes or re-scores a listing calls
:func:`worker.outbound.outbox.record_listing_event` inside its own transaction, so the event row
commits with the state it reports, or not at all: a crash can neither lose an event nor invent
one. After the commit a relay (:mod:`worker.outbound.publish`) XADDs unpublished rows to the
results stream and marks them published; the webhook (:mod:`worker.outbound.webhook`) POSTs
them, signed, with retries and a dead letter. Delivery is at least once: consumers dedupe by
``event_id``. The payload's JSON Schema is :mod:`worker.outbound.schema` (docs/results.schema.json).
"""
