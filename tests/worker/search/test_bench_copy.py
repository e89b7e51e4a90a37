"""bench/search.py loads its vectors into pgvector by binary COPY built with numpy: the rows
read back from the server are the vectors it was given (ids and every half-float)."""

from __future__ import annotations

import io

import numpy as np
import psycopg2

from bench.search import copy_binary
from tests.support import pgvector as pgv


def test_binary_copy_stores_the_ids_and_half_floats_it_was_given() -> None:
    name = pgv.create_database("bench_copy")
    try:
        rng = np.random.default_rng(3)
        rows = rng.standard_normal((5, 7)).astype(np.float16)
        conn = psycopg2.connect(pgv.dsn(name))
        try:
            with conn, conn.cursor() as cur:
                cur.execute("CREATE TABLE v (id bigint PRIMARY KEY, embedding halfvec(7))")
                cur.copy_expert("COPY v (id, embedding) FROM STDIN WITH (FORMAT binary)",
                                io.BytesIO(copy_binary(rows, 40)))
                cur.execute("SELECT id, embedding::text FROM v ORDER BY id")
                stored = cur.fetchall()
        finally:
            conn.close()
        assert [row[0] for row in stored] == [40, 41, 42, 43, 44]
        back = np.array([row[1].strip("[]").split(",") for row in stored], dtype=np.float32)
        assert np.array_equal(back.astype(np.float16), rows)
    finally:
        pgv.drop_database(name)
