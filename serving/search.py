"""The search pipeline, stage by stage:

    user context (Feast, own deadline) -> rewrites (store, own deadline) -> query embedding
    -> Milvus: dense and BM25 search for the query and each rewrite -> reciprocal-rank fusion
    -> the candidates' behaviour stats (Feast, one batched read, the user context's deadline)
    -> multi-task ranker -> top k -> query event published (non-blocking)

Optional dependencies (context, rewrites, item stats, the broker) degrade the answer and say so
in ``degraded`` (without item stats every candidate has the priors, as an item nobody engaged
with); without the index there is no answer, and ``SearchUnavailable`` becomes a 503.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pymilvus import MilvusClient

from tailbridge.streams.item_index import MILVUS_GRPC_OPTIONS
from tailbridge.serving.context import RewriteStore
from tailbridge.serving.filters import compile_filters
from tailbridge.serving.guard import Guarded
from tailbridge.serving.metrics import Metrics
from tailbridge.serving.models import load_query_encoder
from tailbridge.serving.publisher import EventPublisher
from tailbridge.serving.schemas import ItemStats, ScoreParts, SearchHit, SearchRequest, SearchResponse
from tailbridge.streams.events import QueryEvent, ServedItem
from tailbridge.vocab import normalize_query
from tailbridge.streams.feedback import REWRITE_SOURCE_PREFIX
from tailbridge.streams.item_index import alias_name, serving_version
from tailbridge.streams.item_stats import NO_STATS, STATS_FIELDS
from tailbridge.settings import Settings

OUTPUT_FIELDS = ["item_id", "title", "brand", "category", "category_path", "price"]
RRF_K = 60  # the usual reciprocal-rank-fusion constant: flattens the top ranks' advantage
MAX_REWRITES = 3
VERSION_CHECK_SECONDS = 10.0


class SearchUnavailable(Exception):
    """Search cannot answer at all (the item index is unreachable or empty)."""


class ItemIndex:
    """The serving Milvus collection and the query encoder whose vectors match it.

    Connects lazily (the handler starts, and says it is not ready, while Milvus is down) and
    re-reads the serving version every few seconds so a reindex is followed."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._client: MilvusClient | None = None
        self._checked = 0.0
        self.version: str | None = None
        self.encoder: Any = None

    def _connect(self) -> MilvusClient:
        if self._client is None:
            try:
                self._client = MilvusClient(uri=self.settings.milvus_uri, timeout=self.settings.serve_milvus_timeout_s,
                                            grpc_options=MILVUS_GRPC_OPTIONS)
            except Exception as exc:
                raise SearchUnavailable(f"Milvus at {self.settings.milvus_uri} is unreachable ({exc}); "
                                        "search needs the item index") from None
        return self._client

    def ready(self, probe: bool = False) -> tuple[Any, MilvusClient]:
        """(encoder, client) for the serving version; loads the encoder on first use or after a
        reindex. The version is re-read every few seconds, or now with ``probe`` (readiness).
        While one thread re-reads it, the others go on with the current encoder: queueing them
        behind its Milvus round trips stalled every search whenever Milvus was slow."""
        if not probe and self.encoder is not None:
            if time.monotonic() - self._checked <= VERSION_CHECK_SECONDS or not self._lock.acquire(blocking=False):
                return self.encoder, self._client
        else:
            self._lock.acquire()
        try:
            return self._refresh(probe)
        finally:
            self._lock.release()

    def _refresh(self, probe: bool) -> tuple[Any, MilvusClient]:
        """ready() with the lock held."""
        client = self._connect()
        if probe or self.encoder is None or time.monotonic() - self._checked > VERSION_CHECK_SECONDS:
            try:
                version = serving_version(client, self.settings)
            except Exception as exc:
                raise SearchUnavailable(f"Milvus at {self.settings.milvus_uri} did not answer ({exc}); "
                                        "search needs the item index") from None
            if version is None:
                raise SearchUnavailable(f"no items indexed yet (no collection behind alias "
                                        f"{alias_name(self.settings)!r}): run `tailbridge worker` and publish the catalog")
            if version != self.version:
                self.encoder, self.version = load_query_encoder(version, self.settings), version
            self._checked = time.monotonic()
        return self.encoder, client

    def search(self, vectors: np.ndarray, texts: list[str], limit: int,
               expr: str) -> tuple[list[list[dict]], list[list[dict]]]:
        """Dense and BM25 hits for each (vector, text) pair: two Milvus calls whatever the count."""
        _, client = self.ready()
        common = dict(limit=limit, filter=expr, output_fields=OUTPUT_FIELDS,
                      timeout=self.settings.serve_milvus_timeout_s)
        try:
            dense = client.search(alias_name(self.settings), data=vectors.tolist(), anns_field="vector",
                                  search_params={"metric_type": "IP", "params": {"ef": max(64, 2 * limit)}}, **common)
            bm25 = client.search(alias_name(self.settings), data=texts, anns_field="sparse",
                                 search_params={"metric_type": "BM25"}, **common)
        except Exception as exc:
            raise SearchUnavailable(f"Milvus at {self.settings.milvus_uri} failed the search ({type(exc).__name__}: "
                                    f"{exc}); search needs the item index") from None
        return [list(hits) for hits in dense], [list(hits) for hits in bm25]


@dataclass
class Candidate:
    item_id: str
    fields: dict[str, Any]
    fused: float = 0.0
    routes: list[str] = field(default_factory=list)
    source: str = ""
    best_rank: int = 1 << 30
    dense: tuple[float, int] | None = None  # (score, rank) on the best dense route
    bm25: tuple[float, int] | None = None


def fuse(routes: list[tuple[str, str, list[dict]]]) -> list[Candidate]:
    """Reciprocal-rank fusion of (source, kind, hits) lists; kind is 'dense' or 'bm25'.
    A candidate's source is the route where it ranked best (ties: the earlier route)."""
    candidates: dict[str, Candidate] = {}
    for source, kind, hits in routes:
        for rank, hit in enumerate(hits, start=1):
            fields = hit["entity"]
            item_id = str(fields["item_id"])
            c = candidates.get(item_id) or candidates.setdefault(item_id, Candidate(item_id, dict(fields)))
            c.fused += 1.0 / (RRF_K + rank)
            c.routes.append(f"{source}/{kind}" if source.startswith(REWRITE_SOURCE_PREFIX) else kind)
            if rank < c.best_rank:
                c.best_rank, c.source = rank, (source if source.startswith(REWRITE_SOURCE_PREFIX) else kind)
            part = (float(hit["distance"]), rank)
            if kind == "dense" and (c.dense is None or rank < c.dense[1]):
                c.dense = part
            if kind == "bm25" and (c.bm25 is None or rank < c.bm25[1]):
                c.bm25 = part
    return sorted(candidates.values(), key=lambda c: (-c.fused, c.item_id))


def blend(heads: list[dict[str, float]], retrieval_weight: float) -> None:
    """Add ``final`` to each candidate's ranker output (candidates in fused order): the ranker's
    score relative to the best of this search, plus ``retrieval_weight`` x a reciprocal-rank
    prior of the fused order (1 for the first). The ranker learned behaviour on logged pages,
    which are nearly all relevant, so alone it under-weights relevance: re-ranking MiniLM's top
    50 on the demo's judged test queries, nDCG@10 falls from 0.577 to 0.500 by the ranker
    alone and rises to 0.585 with this blend at weight 1 (bench/ranker_relevance.py)."""
    best = max(h["score"] for h in heads) or 1.0
    for rank, h in enumerate(heads, start=1):
        h["ranker"] = h["score"] / best
        h["retrieval_prior"] = (RRF_K + 1) / (RRF_K + rank)
        h["final"] = h["ranker"] + retrieval_weight * h["retrieval_prior"]


class StageTimer:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.ms[name] = round(elapsed * 1000, 3)
            self.metrics.stage_seconds.labels(name).observe(elapsed)


class SearchService:
    def __init__(self, settings: Settings, metrics: Metrics, index: ItemIndex, publisher: EventPublisher,
                 read_context: Callable[[str], dict[str, Any] | None] | None,
                 read_item_stats: Callable[[list[str]], dict[str, dict[str, float]]] | None,
                 rewrites: RewriteStore | None, ranker: Any | None):
        self.settings = settings
        self.metrics = metrics
        self.index = index
        self.publisher = publisher
        self.read_context = read_context
        self.read_item_stats = read_item_stats
        self.rewrite_store = rewrites
        self.ranker = ranker
        timeout_s, cooldown = settings.serve_context_timeout_ms / 1000, settings.serve_dependency_cooldown_s
        self.context_guard = Guarded("user_context", timeout_s, cooldown)
        self.rewrites_guard = Guarded("rewrites", timeout_s, cooldown)
        # Its own guard, though it reads the same store: a slow stats read for 50 candidates
        # must not put the one-row context read (personalisation) into cooldown.
        self.stats_guard = Guarded("item_stats", timeout_s, cooldown)

    def search(self, request: SearchRequest) -> SearchResponse:
        started = time.perf_counter()
        timer = StageTimer(self.metrics)
        degraded: list[str] = []
        query_id = uuid.uuid4().hex

        context = None
        with timer.stage("user_context"):
            if request.user_id and self.read_context is None:
                degraded.append("user_context")
            elif request.user_id:
                outcome = self.context_guard.call(lambda: self.read_context(request.user_id))
                context = outcome.value
                if not outcome.ok:
                    degraded.append("user_context")

        rewrites: list[str] = []
        with timer.stage("rewrites"):
            if self.rewrite_store is None:
                degraded.append("rewrites")
            else:
                key = normalize_query(request.query)
                outcome = self.rewrites_guard.call(lambda: self.rewrite_store.get(key))
                if outcome.ok:
                    rewrites = [r for r in dict.fromkeys(outcome.value) if normalize_query(r) != key][:MAX_REWRITES]
                else:
                    degraded.append("rewrites")

        texts = [request.query, *rewrites]
        with timer.stage("embed"):
            encoder, _ = self.index.ready()
            vectors = encoder.encode_queries(texts, [context] * len(texts))

        limit = max(self.settings.serve_candidates, request.k)
        with timer.stage("retrieve"):
            dense, bm25 = self.index.search(vectors, texts, limit, compile_filters(request.filters))

        with timer.stage("fuse"):
            sources = ["query", *(REWRITE_SOURCE_PREFIX + r for r in rewrites)]
            routes = [(src, "dense", hits) for src, hits in zip(sources, dense)]
            routes += [(src, "bm25", hits) for src, hits in zip(sources, bm25)]
            candidates = fuse(routes)[:limit]

        with timer.stage("item_stats"):  # the ranker reads every candidate's; without one, the hits need theirs
            self._add_item_stats(candidates if self.ranker is not None else candidates[:request.k], degraded)

        heads: list[dict[str, float]] | None = None
        if self.ranker is not None and candidates:
            with timer.stage("rank"):
                heads = self.ranker.score(request.query, [c.fields for c in candidates], context,
                                          self.settings.ranker_weights)
                blend(heads, self.settings.serve_retrieval_weight)
                order = sorted(range(len(candidates)), key=lambda i: (-heads[i]["final"], i))
                candidates, heads = [candidates[i] for i in order], [heads[i] for i in order]

        top = candidates[:request.k]
        hits = [self._hit(c, position, heads[position - 1] if heads else None, request.explain)
                for position, c in enumerate(top, start=1)]
        versions = {"encoder": self.index.version or "", "ranker": getattr(self.ranker, "version", "none"),
                    "rewrites": getattr(self.rewrite_store, "version", "none")}

        with timer.stage("publish"):
            self._publish(request, query_id, hits, rewrites, versions)

        for dependency in degraded:
            self.metrics.degraded.labels(dependency).inc()
        self.metrics.searches.labels(str(context is not None).lower()).inc()
        total = time.perf_counter() - started
        self.metrics.search_seconds.observe(total)
        timer.ms["total"] = round(total * 1000, 3)
        return SearchResponse(query_id=query_id, query=request.query, user_id=request.user_id,
                              personalized=context is not None, results=hits, rewrites=rewrites, degraded=degraded,
                              model_versions=versions, timings_ms=timer.ms if request.explain else None)

    def _add_item_stats(self, candidates: list[Candidate], degraded: list[str]) -> None:
        """Put each candidate's behaviour stats into its fields (the ranker's item features)."""
        stats: dict[str, dict[str, float]] = {}
        if self.read_item_stats is None:
            degraded.append("item_stats")
        elif candidates:
            outcome = self.stats_guard.call(lambda: self.read_item_stats([c.item_id for c in candidates]))
            if outcome.ok:
                stats = outcome.value
            else:
                degraded.append("item_stats")
        for c in candidates:
            c.fields.update(stats.get(c.item_id) or NO_STATS)

    @staticmethod
    def _hit(c: Candidate, position: int, heads: dict[str, float] | None, explain: bool) -> SearchHit:
        f = c.fields
        parts = None
        if explain:
            parts = ScoreParts(dense_score=c.dense[0] if c.dense else None, dense_rank=c.dense[1] if c.dense else None,
                               bm25_score=c.bm25[0] if c.bm25 else None, bm25_rank=c.bm25[1] if c.bm25 else None,
                               fused=c.fused, routes=c.routes,
                               **{h: heads.get(h) for h in ("click", "add_to_cart", "purchase", "ranker", "retrieval_prior")}
                               if heads else {})
        return SearchHit(item_id=c.item_id, position=position, score=heads["final"] if heads else c.fused,
                         title=f.get("title", ""), brand=f.get("brand", ""), category=f.get("category", ""),
                         price=float(f.get("price") or 0.0), source=c.source,
                         stats=ItemStats(**{name: f[name] for name in STATS_FIELDS}), parts=parts)

    def _publish(self, request: SearchRequest, query_id: str, hits: list[SearchHit], rewrites: list[str],
                 versions: dict[str, str]) -> None:
        event = QueryEvent(user_id=request.user_id or "anonymous", session_id=request.session_id or query_id,
                           query_id=query_id, query=request.query, rewrites_used=rewrites, model_versions=versions,
                           served=[ServedItem(item_id=h.item_id, position=h.position, score=h.score, source=h.source)
                                   for h in hits])
        self.publisher.publish(event)

    def close(self) -> None:
        self.context_guard.close()
        self.rewrites_guard.close()
        self.stats_guard.close()
