"""Behaviour vectors refreshed from the feedback log between fine-tunings, without a new version.

A trained retriever's graph component is a fixed table of spectral node vectors per side
(``model.GraphEmbedding``), computed at training time from judgements and the log
(``graph.py``). New behaviour arrives all the time: items engaged for new queries, new items,
new queries. A refresh folds those nodes in against the artifact's saved factors
(``graph.GraphFactors``, ``graph_factors.npz``): every query and item with an engagement logged
since training gets the fold-in of all its edges (training ones and logged ones), so a new node
gets a row instead of the learned "unknown" vector and a warm one moves with its new edges. The
factors, the weights and every other row stay as trained, so the version is unchanged and
vectors of before and after stay comparable: a refresh is data, not a model.

The rows live in an overlay beside the artifact (``behaviour_overlay.npz``; replaced whole,
atomically, with a refresh counter). Both encoders read it when they load: the torch one
(``encoders.UnifiedEncoder``, the stream indexer's) appends or overwrites rows of its tables,
the ONNX query tower (``export.OnnxQueryEncoder``, the handler's) gets the same bigger query
table as the initializer of its unchanged graph. ``overlay_stamp`` says when a loaded encoder is
out of date. Re-upserting the changed items to Milvus is the streams layer's
(``streams.indexer.refresh_vectors``); the command is ``tailbridge models refresh-behaviour``
(and every ``tailbridge loop`` poll, ``tailbridge/cli/behaviour.py``).

``next_window_recall`` measures a refresh: recall@k of the engagements logged in the window after
it, for warm items (a row at training) and newly engaged ones (a row only after the refresh).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tailbridge.models.retrieval.graph import GraphFactors, interaction_edges
from tailbridge.vocab import ENGAGEMENT, normalize_query

OVERLAY_FILE = "behaviour_overlay.npz"
PENDING_FILE = "behaviour_overlay.pending.json"  # items whose new vectors may not have reached Milvus yet


@dataclass
class Overlay:
    """Rows that replace or extend a version's graph tables, and what they were made from."""

    refreshes: int = 0  # how many refreshes wrote this file (the counter a reader can show)
    log_until: tuple[str, str] | None = None  # (ISO time, search id) of the last logged search folded in
    query_rows: dict[str, np.ndarray] = field(default_factory=dict)
    item_rows: dict[str, np.ndarray] = field(default_factory=dict)
    edges: dict[tuple[str, str], float] = field(default_factory=dict)  # engagement edges logged since training
    refreshed_at: str = ""  # ISO time of the refresh


def factors_path(model_dir: Path) -> Path:
    from tailbridge.models.retrieval.model import GRAPH_FACTORS_FILE

    return Path(model_dir) / GRAPH_FACTORS_FILE


def overlay_stamp(model_dir: Path) -> tuple[int, int] | None:
    """Identifies the overlay file now there (None: none): a replaced file is a new inode."""
    try:
        st = (Path(model_dir) / OVERLAY_FILE).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def read_overlay(model_dir: Path) -> Overlay | None:
    path = Path(model_dir) / OVERLAY_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        rows = {side: dict(zip((str(k) for k in f[f"{side}_keys"]), f[f"{side}_rows"])) for side in ("query", "item")}
        edges = {(str(q), str(i)): float(w) for q, i, w in zip(f["edge_query"], f["edge_item"], f["edge_weight"])}
    until = meta.get("log_until")
    return Overlay(meta["refreshes"], tuple(until) if until else None, rows["query"], rows["item"], edges,
                   meta.get("refreshed_at", ""))


def write_overlay(model_dir: Path, overlay: Overlay, rank: int) -> Path:
    """Replace the overlay whole (temporary file, fsync, rename): a reader sees the old or the new one."""
    path = Path(model_dir) / OVERLAY_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def table(rows: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(list(rows.values()), np.float32).reshape(len(rows), rank)

    meta = {"refreshes": overlay.refreshes, "log_until": overlay.log_until, "refreshed_at": overlay.refreshed_at}
    with open(tmp, "wb") as out:
        np.savez(out, meta=np.asarray(json.dumps(meta)),
                 query_keys=np.asarray(list(overlay.query_rows), dtype=str), query_rows=table(overlay.query_rows),
                 item_keys=np.asarray(list(overlay.item_rows), dtype=str), item_rows=table(overlay.item_rows),
                 edge_query=np.asarray([q for q, _ in overlay.edges], dtype=str),
                 edge_item=np.asarray([i for _, i in overlay.edges], dtype=str),
                 edge_weight=np.asarray(list(overlay.edges.values()), np.float64))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return path


def read_pending(model_dir: Path) -> list[str]:
    path = Path(model_dir) / PENDING_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def write_pending(model_dir: Path, item_ids: Sequence[str]) -> None:
    """Items to re-upsert, recorded before the overlay that changes them: a refresh killed before
    its upserts finished leaves them here, and the next one upserts them too. Empty: removed."""
    path = Path(model_dir) / PENDING_FILE
    if not item_ids:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(sorted(set(item_ids))))
    os.replace(tmp, path)


# ------------------------------------------------------------------ the refresh


def logged_after(frame: pd.DataFrame, since: tuple[str, str] | None,
                 until: pd.Timestamp | None = None) -> pd.DataFrame:
    """Rows of searches after ``since`` ((time, search id), the order the log is read in) and,
    with ``until``, at or before that time. ``frame`` is ``read_feedback``'s."""
    keep = np.ones(len(frame), dtype=bool)
    if since is not None:
        at = pd.Timestamp(since[0])
        times, ids = frame["event_time"], frame["query_id"].astype(str)
        keep &= ((times > at) | ((times == at) & (ids > since[1]))).to_numpy()
    if until is not None:
        keep &= (frame["event_time"] <= until).to_numpy()
    return frame[keep].sort_values(["event_time", "query_id"], kind="stable")


def logged_edges(rows: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Engagement edges of logged rows, weighted as training weighs them (``graph.interaction_edges``)."""
    searches: dict[str, dict[str, Any]] = {}
    for qid, query, item_id, label in zip(rows["query_id"], rows["query"], rows["item_id"], rows["label"]):
        searches.setdefault(str(qid), {"query": str(query), "items": {}})["items"][str(item_id)] = str(label)
    return interaction_edges({}, {}, searches)


def engagements(rows: pd.DataFrame) -> int:
    """Logged rows that add an edge (a click or better)."""
    return int(rows["label"].map(lambda label: ENGAGEMENT.get(label, 0) > 0).sum())


@dataclass
class Refresh:
    overlay: Overlay
    searches: int  # new logged searches read
    engagements: int  # of their rows, those that add an edge
    changed_items: list[str]  # whose row is new or moved: their vectors must be re-upserted
    changed_queries: list[str]
    new_items: int  # rows for items the graph did not have
    new_queries: int


def refresh(factors: GraphFactors, previous: Overlay | None, frame: pd.DataFrame,
            until: pd.Timestamp | None = None, tolerance: float = 1e-5) -> Refresh:
    """The next overlay: ``previous`` (None: none yet) plus what was logged since it (since
    training, the first time) up to ``until``. Pure: nothing is written."""
    since = previous.log_until if previous is not None else factors.log_until
    rows = logged_after(frame, since, until)
    edges = dict(previous.edges) if previous is not None else {}
    for edge, weight in logged_edges(rows).items():
        edges[edge] = edges.get(edge, 0.0) + weight
    # Every node with a logged edge is folded in with all of its edges, training ones included.
    touched_items = {i for _, i in edges}
    touched_queries = {q for q, _ in edges}
    item_edges: dict[str, dict[str, float]] = {i: {} for i in touched_items}
    query_edges: dict[str, dict[str, float]] = {q: {} for q in touched_queries}
    for source in (factors.edges, edges):
        for (q, i), w in source.items():
            if i in item_edges:
                item_edges[i][q] = item_edges[i].get(q, 0.0) + w
            if q in query_edges:
                query_edges[q][i] = query_edges[q].get(i, 0.0) + w
    item_rows = factors.fold_in_items(item_edges)
    query_rows = factors.fold_in_queries(query_edges)

    def changed(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray], trained: Mapping[str, int],
                trained_rows: np.ndarray) -> list[str]:
        out = []
        for key, row in new.items():
            before = old.get(key)
            if before is None and key in trained:
                before = trained_rows[trained[key]]
            if before is None or float(np.abs(row - before).max()) > tolerance:
                out.append(key)
        return sorted(out)

    old_items = previous.item_rows if previous is not None else {}
    old_queries = previous.query_rows if previous is not None else {}
    trained_items = {i: r for r, i in enumerate(factors.items)}
    trained_queries = {q: r for r, q in enumerate(factors.queries)}
    overlay = Overlay(
        refreshes=(previous.refreshes if previous is not None else 0) + 1,
        log_until=(rows["event_time"].iloc[-1].isoformat(), str(rows["query_id"].iloc[-1])) if len(rows) else since,
        query_rows=query_rows, item_rows=item_rows, edges=edges, refreshed_at=datetime.now(UTC).isoformat())
    return Refresh(
        overlay, searches=int(rows["query_id"].nunique()), engagements=engagements(rows),
        changed_items=changed(item_rows, old_items, trained_items, factors.item_rows()),
        changed_queries=changed(query_rows, old_queries, trained_queries, factors.query_rows()),
        new_items=sum(i not in trained_items for i in item_rows),
        new_queries=sum(q not in trained_queries for q in query_rows))


# ------------------------------------------------------------------ applying an overlay


def extend_table(table: np.ndarray, rows: Mapping[str, int], overlay_rows: Mapping[str, np.ndarray]
                 ) -> tuple[np.ndarray, dict[str, int]]:
    """A side's table and key -> row map with the overlay's rows: a known key's row overwritten,
    a new key's appended. The trained rows of every other key are untouched."""
    rows = dict(rows)
    new = [k for k in overlay_rows if k not in rows]
    out = np.concatenate([np.asarray(table, np.float32), np.zeros((len(new), table.shape[1]), np.float32)])
    for key in new:
        rows[key] = len(rows)
    for key, row in overlay_rows.items():
        out[rows[key]] = row
    return out, rows


def apply_to_model(model, featurizer, overlay: Overlay | None) -> None:
    """Give a loaded torch model (``model.UnifiedRetriever``) and its featurizer the overlay's rows."""
    import torch

    if overlay is None:
        return
    for tower, side, attr in ((model.query_tower, overlay.query_rows, "graph_queries"),
                              (model.item_tower, overlay.item_rows, "graph_items")):
        if not side:
            continue
        table, rows = extend_table(tower.graph.table.detach().cpu().numpy(), getattr(featurizer, attr), side)
        tower.graph.table = torch.from_numpy(table)  # a registered buffer: assignment replaces it
        setattr(featurizer, attr, rows)


# ------------------------------------------------------------------ measuring a refresh


def next_window_recall(items: Sequence[Mapping[str, Any]], window: pd.DataFrame,
                       encoders: Mapping[str, Any], groups: Mapping[str, Callable[[str, str], bool]],
                       k: int = 100) -> dict[str, dict[str, float]]:
    """Recall@k of the engagements (click or better) logged in ``window``: per encoder name
    (e.g. before / after the refresh) and per group of (normalised query, item id) pairs (a
    predicate, e.g. "the item had a graph row at training"), the share of engaged pairs whose
    item is in the top ``k`` of an exact search of the query over ``items``. No user context:
    what moves is the behaviour block."""
    catalog = {str(it["item_id"]) for it in items}
    engaged = window[window["label"].map(lambda label: ENGAGEMENT.get(label, 0) > 0)
                     & window["item_id"].astype(str).isin(catalog)]
    pairs = list(dict.fromkeys(zip(engaged["query"].astype(str).map(normalize_query), engaged["item_id"].astype(str))))
    queries = sorted({q for q, _ in pairs})
    ids = np.asarray([str(it["item_id"]) for it in items])
    out: dict[str, dict[str, float]] = {}
    for name, encoder in encoders.items():
        item_vecs = encoder.encode_items(list(items))
        query_vecs = encoder.encode_queries(queries)
        kk = min(k, len(ids))
        top = np.argpartition(-(query_vecs @ item_vecs.T), kk - 1, axis=1)[:, :kk]
        found = {q: set(ids[row]) for q, row in zip(queries, top)}
        scores: dict[str, float] = {}
        for group, member in groups.items():
            hits = [i in found[q] for q, i in pairs if member(q, i)]
            scores[group] = float(np.mean(hits)) if hits else float("nan")
            scores[f"{group}_pairs"] = float(len(hits))
        out[name] = scores
    return out
