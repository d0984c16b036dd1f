"""Graph embeddings of the query-item interaction graph (the retriever's behaviour component).

Nodes are normalised query strings and item ids; an edge's weight adds up the evidence that
the item answers the query: training judgements (the grade) and, when there is a feedback log,
engagements (clicked 1, added to cart 2, purchased 3; a shown-but-unclicked item adds nothing).

The embedding is spectral: the top singular vectors of the degree-normalised biadjacency
``D_q^-1/2 A D_i^-1/2`` (the bipartite form of spectral clustering / LightGCN's propagation),
row-normalised. Items bought for the same queries land close together; a new query or item has
no row and the model uses its learned "unknown" vector instead (``GraphEmbedding`` in ``models/retrieval/model.py``)
until a behaviour refresh folds it in against the saved factors (``GraphFactors``, ``models/retrieval/behaviour.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tailbridge.vocab import ENGAGEMENT, normalize_query


def interaction_edges(
    judgements: Mapping[str, Mapping[str, int]],
    query_text: Mapping[str, str],
    feedback_searches: Mapping[str, Mapping] | None = None,
) -> dict[tuple[str, str], float]:
    """(query key, item id) -> weight, from graded judgements and logged searches."""
    edges: dict[tuple[str, str], float] = {}
    for qid, judged in judgements.items():
        key = normalize_query(query_text[qid])
        for item_id, grade in judged.items():
            if grade > 0:
                edges[(key, item_id)] = edges.get((key, item_id), 0.0) + float(grade)
    for search in (feedback_searches or {}).values():
        key = normalize_query(search["query"])
        for item_id, label in search["items"].items():
            weight = float(ENGAGEMENT.get(label, 0))
            if weight:
                edges[(key, item_id)] = edges.get((key, item_id), 0.0) + weight
    return edges


def randomized_svd(matrix, rank: int, seed: int, oversample: int = 10, power_iterations: int = 4):
    """Top-``rank`` SVD by a seeded randomized range finder (Halko et al.): unlike ARPACK it is
    deterministic for a seed even when singular values repeat (one per connected component)."""
    rng = np.random.default_rng(seed)
    sketch = matrix @ rng.standard_normal((matrix.shape[1], rank + oversample))
    q, _ = np.linalg.qr(sketch)
    for _ in range(power_iterations):
        q, _ = np.linalg.qr(matrix.T @ q)
        q, _ = np.linalg.qr(matrix @ q)
    u_small, s, vt = np.linalg.svd(np.asarray((matrix.T @ q).T), full_matrices=False)
    u = q @ u_small
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])  # vectors are defined up to sign
    return u * signs, s, vt * signs[:, None]


def spectral_factors(edges: Mapping[tuple[str, str], float], rank: int, seed: int = 0) -> GraphFactors:
    """The graph's truncated SVD; its ``query_rows`` / ``item_rows`` are the node vectors (unit
    rows), and it is kept whole with the artifact so nodes can be folded in later."""
    import scipy.sparse as sp

    queries = sorted({q for q, _ in edges})
    items = sorted({i for _, i in edges})
    if not edges:
        empty = np.zeros((0, 0))
        return GraphFactors([], [], empty, np.zeros(0), empty, np.zeros(0), np.zeros(0), {}, rank)
    q_row = {q: r for r, q in enumerate(queries)}
    i_row = {i: r for r, i in enumerate(items)}
    rows = np.fromiter((q_row[q] for q, _ in edges), dtype=np.int64, count=len(edges))
    cols = np.fromiter((i_row[i] for _, i in edges), dtype=np.int64, count=len(edges))
    vals = np.fromiter(edges.values(), dtype=np.float64, count=len(edges))
    adj = sp.csr_matrix((vals, (rows, cols)), shape=(len(queries), len(items)))
    # Degree-regularised normalisation (regularised spectral clustering): adding the mean degree
    # keeps low-degree nodes and small components from dominating the top vectors.
    dq = np.asarray(adj.sum(axis=1)).ravel()
    di = np.asarray(adj.sum(axis=0)).ravel()
    dq, di = dq + dq.mean(), di + di.mean()
    norm = sp.diags(1 / np.sqrt(dq)) @ adj @ sp.diags(1 / np.sqrt(di))
    k = min(rank, *norm.shape)
    u, s, vt = randomized_svd(norm.tocsr(), k, seed)
    return GraphFactors(queries, items, u, s, vt.T, dq, di, dict(edges), rank)


@dataclass
class GraphFactors:
    """The graph's normalised biadjacency ``N = D_q^-1/2 A D_i^-1/2 ~ U S V^T``, its (regularised)
    degrees and edges: what folding a node in needs.

    A node's spectral vector is its row of ``U S^1/2`` (query) or ``V S^1/2`` (item), unit length.
    Folding in an item with edge weights ``a`` to known queries projects its normalised column on
    the current factors, ``v = a^T D_q^-1/2 U S^-1`` (the SVD's own relation ``V = N^T U S^-1``),
    and scales it like the others: ``v S^1/2``, unit length; the item's own degree is one scalar,
    which the unit length removes. An item folded in with exactly the edges of a known item gets
    that item's vector. Queries the same way with ``V`` and the item degrees. The factors never
    change, so every vector made from them stays comparable with the model's."""

    queries: list[str]
    items: list[str]
    u: np.ndarray  # [m, k] left singular vectors (queries)
    s: np.ndarray  # [k] singular values, descending
    v: np.ndarray  # [n, k] right singular vectors (items)
    query_degree: np.ndarray  # [m] degree + mean degree: the normalisation's
    item_degree: np.ndarray  # [n]
    edges: dict[tuple[str, str], float]  # the graph's own: a changed node is folded in with all its edges
    rank: int  # width of the node vectors (k <= rank; the rest is zero)
    log_until: tuple[str, str] | None = None  # (ISO time, search id) of the last logged search in ``edges``

    def _unit(self, factor: np.ndarray) -> np.ndarray:
        out = np.zeros((len(factor), self.rank), np.float32)
        out[:, :factor.shape[1]] = factor * np.sqrt(self.s)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def query_rows(self) -> np.ndarray:
        return self._unit(self.u)

    def item_rows(self) -> np.ndarray:
        return self._unit(self.v)

    def fold_in_items(self, edges: Mapping[str, Mapping[str, float]]) -> dict[str, np.ndarray]:
        """item id -> unit row, for items given {item: {query key: weight}}; an item none of
        whose queries is in the graph has no row (it keeps the "unknown" vector)."""
        return self._fold(edges, {q: r for r, q in enumerate(self.queries)}, self.u, self.query_degree)

    def fold_in_queries(self, edges: Mapping[str, Mapping[str, float]]) -> dict[str, np.ndarray]:
        """query key -> unit row, for queries given {query key: {item id: weight}}."""
        return self._fold(edges, {i: r for r, i in enumerate(self.items)}, self.v, self.item_degree)

    def _fold(self, edges: Mapping[str, Mapping[str, float]], row_of: Mapping[str, int], factor: np.ndarray,
              degree: np.ndarray) -> dict[str, np.ndarray]:
        # A zero singular value's component is zero in every node vector (scaled by sqrt(0)): keep it so.
        kept = self.s > 1e-9 * self.s.max(initial=0.0)
        inv_sqrt_s = np.where(kept, 1 / np.sqrt(np.where(kept, self.s, 1.0)), 0.0)
        out = {}
        for node, neighbours in edges.items():
            known = [(row_of[n], w) for n, w in neighbours.items() if n in row_of and w > 0]
            if not known:
                continue
            rows = np.fromiter((r for r, _ in known), dtype=np.int64, count=len(known))
            weights = np.fromiter((w for _, w in known), dtype=np.float64, count=len(known)) / np.sqrt(degree[rows])
            vec = np.zeros(self.rank, np.float32)
            vec[:factor.shape[1]] = (weights @ factor[rows]) * inv_sqrt_s
            norm = float(np.linalg.norm(vec))
            if norm > 1e-12:
                out[node] = vec / norm
        return out

    def save(self, path: Path) -> None:
        q_row = {q: r for r, q in enumerate(self.queries)}
        i_row = {i: r for r, i in enumerate(self.items)}
        np.savez(path, queries=np.asarray(self.queries, dtype=str), items=np.asarray(self.items, dtype=str),
                 u=self.u, s=self.s, v=self.v, query_degree=self.query_degree, item_degree=self.item_degree,
                 edge_query=np.fromiter((q_row[q] for q, _ in self.edges), np.int64, len(self.edges)),
                 edge_item=np.fromiter((i_row[i] for _, i in self.edges), np.int64, len(self.edges)),
                 edge_weight=np.fromiter(self.edges.values(), np.float64, len(self.edges)), rank=self.rank,
                 log_until=np.asarray(self.log_until or ("", ""), dtype=str))

    @classmethod
    def load(cls, path: Path) -> GraphFactors:
        with np.load(path, allow_pickle=False) as f:
            queries, items = [str(q) for q in f["queries"]], [str(i) for i in f["items"]]
            edges = {(queries[q], items[i]): float(w)
                     for q, i, w in zip(f["edge_query"], f["edge_item"], f["edge_weight"])}
            until = tuple(str(x) for x in f["log_until"])
            return cls(queries, items, f["u"], f["s"], f["v"], f["query_degree"], f["item_degree"], edges,
                       int(f["rank"]), until if until[0] else None)
