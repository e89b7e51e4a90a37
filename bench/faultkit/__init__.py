"""Building blocks of the fault suite (``python -m bench.faults``, issue 12).

* ``servers``: Postgres and Redis instances of the suite's own, on their own ports and in a
  temporary directory, that it stops, restarts and always tears down (never the machine's
  shared servers on 5432/6379);
* ``images``: a local image host with slow, crashing and hanging routes;
* ``deployment``: the real ``catalog`` processes (ingest, worker, beat) wired to those servers;
* ``measure``: what a scenario sent, and what the database and the streams say happened to it;
* ``report``: the table, the notes with log evidence, the verdict.
"""
