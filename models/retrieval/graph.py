"""Graph embeddings of the query-item interaction graph (the retriever's behaviour component).

Nodes are normalised query strings and item ids; an edge's weight adds up the evidence that
the item answers the query: training judgements (the grade) and, when there is a feedback log,
engagements (clicked 1, added to cart 2, purchased 3; a shown-but-unclicked item adds nothing).

The embedding is spectral: the top singular vectors of the degree-normalised biadjacency
``D_q^-1/2 A D_i^-1/2`` (the bipartite form of spectral clustering / LightGCN's propagation),
row-normalised. Items bought for the same queries land close together; a new query or item has
no row and the model uses its learned "unknown" vector instead (``GraphEmbedding`` in ``models/retrieval/model.py``).
"""

from __future__ import annotations

from collections.abc import Mapping

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


def spectral_embedding(edges: Mapping[tuple[str, str], float], rank: int, seed: int = 0
                       ) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(query keys, query vectors [m, rank], item ids, item vectors [n, rank]), unit rows."""
    import scipy.sparse as sp

    queries = sorted({q for q, _ in edges})
    items = sorted({i for _, i in edges})
    if not edges:
        return [], np.zeros((0, rank), np.float32), [], np.zeros((0, rank), np.float32)
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
    norm = sp.diags(1 / np.sqrt(dq + dq.mean())) @ adj @ sp.diags(1 / np.sqrt(di + di.mean()))
    k = min(rank, *norm.shape)
    u, s, vt = randomized_svd(norm.tocsr(), k, seed)
    scale = np.sqrt(s)
    qv = np.zeros((len(queries), rank), np.float32)
    iv = np.zeros((len(items), rank), np.float32)
    qv[:, :k] = u * scale
    iv[:, :k] = vt.T * scale
    for m in (qv, iv):
        m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    return queries, qv, items, iv
