"""Exact search over a data set's catalog, fused the way the query handler fuses its routes.

The handler runs, for the query and for each rewrite, a dense route (the serving encoder,
all-MiniLM-L6-v2 by default) and a BM25 route, then reciprocal-rank fusion (k = 60) over all
of them, a rewrite's routes weighing ``rewrite_weight`` of the query's (the setting
``rewrite_route_weight``). Offline, the rewriter needs the same search to score candidates
(stage 2), to keep mined pairs (rejection sampling), to judge a rewrite's intent before it is
stored (``intent``) and to evaluate: this is it, exact (no ANN), with each route cut at
``depth`` like the handler's per-route candidates. Without a dense encoder (the tests) it is
BM25 alone. A text's routes are computed once and remembered, up to ``REMEMBERED`` texts (the
rewrite worker's search lives as long as the worker).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tailbridge.vocab import item_text

RRF_K = 60  # as serving.search
REMEMBERED = 100_000  # texts whose routes are kept (~1.6 KB each at depth 100); past it, forgotten


class ExactSearch:
    def __init__(self, items: Mapping[str, Mapping[str, Any]], encoder: Any | None = None, depth: int = 100,
                 rewrite_weight: float | None = None):
        import bm25s
        import Stemmer

        from tailbridge.settings import get_settings

        self.item_ids = sorted(items)
        self.depth = depth
        self.rewrite_weight = get_settings().rewrite_route_weight if rewrite_weight is None else rewrite_weight
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

    def _lexical_scores(self, texts: Sequence[str]) -> list[np.ndarray]:
        import bm25s

        tokens = bm25s.tokenize(list(texts), stopwords="en", stemmer=self._stemmer, return_ids=False, show_progress=False)
        return [np.asarray(self._bm25.get_scores(t), dtype=np.float32) if t  # stopwords only: no match
                else np.zeros(len(self.item_ids), dtype=np.float32) for t in tokens]

    def _prepare(self, texts: Sequence[str]) -> None:
        new = [t for t in dict.fromkeys(texts) if t not in self._routes]
        if not new:
            return
        if len(self._routes) + len(new) > REMEMBERED:
            wanted = set(texts)
            self._routes = {t: r for t, r in self._routes.items() if t in wanted}
        vectors = self._encoder.encode_queries(new) @ self._vectors.T if self._encoder is not None else None
        for i, (text, bm25) in enumerate(zip(new, self._lexical_scores(new))):
            routes = [self._top_lexical(bm25)]
            if vectors is not None:
                routes.append(self._top(vectors[i]))
            self._routes[text] = routes

    def _top_lexical(self, scores: np.ndarray) -> np.ndarray:
        """BM25 only returns items that share a term with the text (as Milvus's BM25 does)."""
        top = self._top(scores)
        return top[scores[top] > 0]

    def ranked(self, groups: Sequence[Sequence[str]], k: int = 100) -> list[list[str]]:
        """For each group of texts (a query, then its rewrites), the top ``k`` item ids of the
        reciprocal-rank fusion of every route of every text in it, as the handler weighs them."""
        return [[self.item_ids[r] for r in rows] for rows in self._ranked_rows(groups, k)]

    def _ranked_rows(self, groups: Sequence[Sequence[str]], k: int) -> list[list[int]]:
        self._prepare([t for g in groups for t in g])
        out = []
        for group in groups:
            fused: dict[int, float] = {}
            for position, text in enumerate(dict.fromkeys(group)):
                weight = 1.0 if position == 0 else self.rewrite_weight
                for route in self._routes[text]:
                    for rank, row in enumerate(route.tolist(), start=1):
                        fused[row] = fused.get(row, 0.0) + weight / (RRF_K + rank)
            out.append(sorted(fused, key=lambda r: (-fused[r], r))[:k])
        return out

    def intent(self, queries: Sequence[str], rewrites: Sequence[Sequence[str]], k: int = 10) -> list[list[float]]:
        """How well each rewrite's own top ``k`` serves its query, as the query scores items:
        the mean of the query's scores (dense similarity; BM25 without an encoder) over the
        rewrite's top ``k``, as a share of that mean over the query's own top ``k``. 1: the
        rewrite finds items the query rates as highly as what it finds itself; a rewrite that
        drifts to another product rates low. A query whose own top scores nothing gives 1."""
        if self._encoder is not None:
            scores = list(self._encoder.encode_queries(list(queries)) @ self._vectors.T)
        else:
            scores = self._lexical_scores(queries)
        own = self._ranked_rows([[q] for q in queries], k)
        alone = iter(self._ranked_rows([[r] for texts in rewrites for r in texts], k))
        out = []
        for row_scores, mine, texts in zip(scores, own, rewrites):
            base = float(row_scores[mine].mean()) if mine else 0.0
            found = [next(alone) for _ in texts]
            if base <= 0:  # nothing to compare against
                out.append([1.0] * len(found))
            else:  # a rewrite that retrieves nothing serves nothing
                out.append([float(row_scores[rows].mean()) / base if rows else 0.0 for rows in found])
        return out
