"""Visual search: the vector index over the catalogue and the "similar products" query.

* :mod:`worker.search.vectors`: what is indexed (``search_vectors`` rows: one L2-normalised
  vector per image and kind, ``full`` or ``region``), written with an image's results and
  removed with its listing;
* :mod:`worker.search.index`: the :class:`~worker.search.index.VectorIndex` protocol, its two
  backends (:mod:`worker.search.pgvector`, :mod:`worker.search.embedded`) and ``open_index``;
* :mod:`worker.search.similar`: ``similar()`` -- listings that look like a query vector, with
  filters, same-seller exclusion and near-duplicate collapsing -- and the query vectors of a
  stored image or listing;
* :mod:`worker.search.errors`: :class:`~worker.search.errors.SearchError`, the one-sentence
  errors the CLI and the API show.

See docs/search.md.
"""
