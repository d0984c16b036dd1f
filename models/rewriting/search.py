"""Exact search over a data set's catalog, fused the way the query handler fuses its routes.

The handler runs, for the query and for each rewrite, a dense route (the serving encoder,
all-MiniLM-L6-v2 by default) and a BM25 route, then reciprocal-rank fusion (k = 60) over all
of them. Offline, the rewriter needs the same search to score candidates (stage 2), to keep
mined pairs (rejection sampling) and to evaluate: this is it, exact (no ANN), with each route
cut at ``depth`` like the handler's per-route candidates. Without a dense encoder (the tests)
it is BM25 alone. A text's routes are computed once and remembered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tailbridge.vocab import item_text

RRF_K = 60  # as serving.search


class ExactSearch:
    def __init__(self, items: Mapping[str, Mapping[str, Any]], encoder: Any | None = None, depth: int = 100):
        import bm25s
        import Stemmer

        self.item_ids = sorted(items)
        self.depth = depth
        self._stemmer = Stemmer.Stemmer("english")
        texts = [item_text(items[i]) for i in self.item_ids]
        self._bm25 = bm25s.BM25()
        self._bm25.index(bm25s.tokenize(texts, stopwords="en", stemmer=self._stemmer, show_progress=False),
                         show_progress=False)
        self._encoder = encoder
        self._vectors = encoder.encode_items([items[i] for i in self.item_ids]) if encoder is not None else None
        self._routes: dict[str, list[np.ndarray]] = {}

    def _top(self, scores: np.ndarray) -> np.ndarray:
        """Row indices of the best ``depth`` scores, best first (ties by index)."""
        k = min(self.depth, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        return top[np.lexsort((top, -scores[top]))]

    def _prepare(self, texts: Sequence[str]) -> None:
        import bm25s

        new = [t for t in dict.fromkeys(texts) if t not in self._routes]
        if not new:
            return
        tokens = bm25s.tokenize(new, stopwords="en", stemmer=self._stemmer, return_ids=False, show_progress=False)
        vectors = self._encoder.encode_queries(new) @ self._vectors.T if self._encoder is not None else None
        for i, text in enumerate(new):
            bm25 = (np.asarray(self._bm25.get_scores(tokens[i]), dtype=np.float32) if tokens[i]  # stopwords only: no match
                    else np.zeros(len(self.item_ids), dtype=np.float32))
            routes = [self._top_lexical(bm25)]
            if vectors is not None:
                routes.append(self._top(vectors[i]))
            self._routes[text] = routes

    def _top_lexical(self, scores: np.ndarray) -> np.ndarray:
        """BM25 only returns items that share a term with the text (as Milvus's BM25 does)."""
        top = self._top(scores)
        return top[scores[top] > 0]

    def ranked(self, groups: Sequence[Sequence[str]], k: int = 100) -> list[list[str]]:
        """For each group of texts (a query and its rewrites), the top ``k`` item ids of the
        reciprocal-rank fusion of every route of every text in it."""
        self._prepare([t for g in groups for t in g])
        out = []
        for group in groups:
            fused: dict[int, float] = {}
            for text in dict.fromkeys(group):
                for route in self._routes[text]:
                    for rank, row in enumerate(route.tolist(), start=1):
                        fused[row] = fused.get(row, 0.0) + 1.0 / (RRF_K + rank)
            best = sorted(fused, key=lambda r: (-fused[r], r))[:k]
            out.append([self.item_ids[r] for r in best])
        return out
