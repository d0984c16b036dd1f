"""BM25 over a catalog (bm25s: Lucene BM25, English stopwords, Snowball stemming), the lexical
baseline of evaluation and one source of training's candidate pool.

A query with no indexable term (only a stopword, a single letter, "10 mm" when neither token is
in the catalog...) retrieves nothing: its score row is all ``-inf``, never an error. Items that
share no term with the query are not retrieved either (``-inf``), so a BM25 ranking holds only
the items the index would return.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tailbridge.vocab import item_text


def bm25_scorer(items: Sequence[Mapping[str, Any]], queries: Sequence[str]) -> Callable[[int, int], np.ndarray]:
    """``scorer(start, end)``: the [end - start, len(items)] BM25 scores of those queries."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    index = bm25s.BM25()
    index.index(bm25s.tokenize([item_text(it) for it in items], stopwords="en", stemmer=stemmer, show_progress=False),
                show_progress=False)
    vocab = set(index.vocab_dict)
    # bm25s raises IndexError on an empty token list; a query whose terms are all unknown to the
    # catalog is the same case (nothing to match), so both become an empty ranking here.
    tokens = [[t for t in q if t in vocab] for q in
              bm25s.tokenize(list(queries), stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)]

    def row(terms: list[str]) -> np.ndarray:
        if not terms:
            return np.full(len(items), -np.inf, dtype=np.float32)
        scores = np.asarray(index.get_scores(terms), dtype=np.float32)
        return np.where(scores > 0, scores, -np.inf).astype(np.float32)

    return lambda start, end: np.stack([row(t) for t in tokens[start:end]]) if end > start \
        else np.zeros((0, len(items)), np.float32)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[Q, <=k] column indices of each row's k best finite scores, best first (ties by index);
    rows are padded with -1 where fewer than k scores are finite."""
    k = min(k, scores.shape[1])
    out = np.full((scores.shape[0], k), -1, dtype=np.int64)
    if k == 0:
        return out
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    for r, cols in enumerate(part):
        cols = cols[np.isfinite(scores[r, cols])]
        cols = cols[np.lexsort((cols, -scores[r, cols]))]
        out[r, :len(cols)] = cols
    return out
