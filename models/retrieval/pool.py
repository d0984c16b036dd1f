"""The candidate pool training works on instead of the whole catalog.

Each training and dev query gets a candidate list once, before training: the union of BM25's
top ``depth`` (``models.retrieval.lexical``) and the starting model's top ``depth`` (MiniLM
with the term block: the untrained unified model) over the whole catalog, plus the query's
judged items. Hard negatives are mined from a training query's own list, re-scored by the
current model; dev queries are ranked over the union of all dev lists. So each model-selection
evaluation and each re-mining encodes the pool, not the catalog (the whole catalog is encoded
twice per training run: with the starting model and with the state that ships).

Dev numbers on the pool are for model selection: they are comparable between states of one run,
not with exact search over the catalog (the artifact's card gives both for the start and the end).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tailbridge.models.metrics import ndcg_at, recall_at


@dataclass
class Pool:
    train: np.ndarray  # [n_train, C] catalog rows per training query, -1 padded
    dev_rows: np.ndarray  # catalog rows the dev queries are ranked over

    @property
    def rows(self) -> np.ndarray:
        """Every catalog row training or model selection needs a vector for."""
        return np.union1d(self.train[self.train >= 0], self.dev_rows)


def candidate_lists(*tops: np.ndarray, extra: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Row-wise union of top-k arrays ([Q, k], -1 padded) and extra rows, -1 padded, in order."""
    n = tops[0].shape[0]
    lists = []
    for q in range(n):
        seen = dict.fromkeys(int(c) for top in tops for c in top[q] if c >= 0)
        if extra is not None:
            seen.update(dict.fromkeys(int(c) for c in extra[q]))
        lists.append(list(seen))
    width = max([1, *(len(x) for x in lists)])
    out = np.full((n, width), -1, dtype=np.int64)
    for q, rows in enumerate(lists):
        out[q, :len(rows)] = rows
    return out


def dev_metrics(query_vectors: np.ndarray, item_vectors: np.ndarray, rows: np.ndarray, item_ids: Sequence[str],
                judgements: Sequence[Mapping[str, int]]) -> dict[str, float]:
    """nDCG@10 and Recall@100 of ranking ``rows`` (catalog rows with ``item_vectors``) per query."""
    if not len(judgements):
        return {}
    scores = query_vectors @ item_vectors.T
    k = min(100, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    ndcg, recall = [], []
    for q, cols in enumerate(top):
        cols = cols[np.argsort(-scores[q, cols], kind="stable")]
        ranked = [item_ids[rows[c]] for c in cols]
        ndcg.append(ndcg_at(ranked, judgements[q]))
        recall.append(recall_at(ranked, judgements[q]))
    return {"dev_ndcg@10": float(np.mean(ndcg)), "dev_recall@100": float(np.mean(recall))}


def fit_fusion(query_blocks: Sequence[np.ndarray], item_blocks: Sequence[np.ndarray], rows: np.ndarray,
               item_ids: Sequence[str], judgements: Sequence[Mapping[str, int]], step: float = 0.05
               ) -> tuple[np.ndarray, float]:
    """The block weights (on the simplex, grid ``step``) that maximise dev nDCG@10 when the score
    is ``sum_k w_k cos_k`` (the model's post-fusion), and that nDCG. Blocks are unit vectors."""
    cosines = [q @ i.T for q, i in zip(query_blocks, item_blocks)]
    best_w, best = None, -1.0
    ticks = np.round(np.arange(0, 1 + 1e-9, step), 6)
    for w in itertools.product(ticks, repeat=len(cosines) - 1):
        last = 1 - sum(w)
        if last < -1e-9:
            continue
        weights = np.array([*w, max(0.0, last)])
        scores = sum(wk * c for wk, c in zip(weights, cosines))
        k = min(10, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        value = float(np.mean([ndcg_at([item_ids[rows[c]] for c in cols[np.argsort(-scores[q, cols], kind="stable")]],
                                       judgements[q]) for q, cols in enumerate(top)]))
        if value > best + 1e-9:
            best_w, best = weights, value
    return best_w, best
