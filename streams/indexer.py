"""The item indexer: catalog upserts and deletes into every live Milvus collection, and the
blue/green reindex that moves serving to a new encoder version without a gap.

Upserts carry the whole product, so applying one twice changes nothing; within a batch only
the last event per item counts (events of one item share a partition, so they arrive in order).
Where a live collection has no BM25 (``item_index.has_bm25``), the indexer also writes the
term index (``streams.term_index``) after the collections, with the same version; the batch's
offsets are committed only after both, so a crash between them is repaired by the replay.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial

import redis
from pymilvus import MilvusClient
from tailbridge.models.retrieval.encoders import Encoder
from tailbridge.models.retrieval.export import load_item_encoder
from tailbridge.streams import item_index, term_index
from tailbridge.streams.behaviour import Keys
from tailbridge.streams.events import CatalogDelete, CatalogUpsert
from tailbridge.streams.failures import Unavailable
from tailbridge.streams.processor import Counts, Processor, Resources

from tailbridge.settings import Settings
from tailbridge.vocab import item_text

LIVE_REFRESH_S = 2.0  # how soon a collection created by `reindex` starts receiving writes


def drain_s(settings: Settings) -> float:
    """How long ``reindex`` keeps the old collection after moving the alias: a query handler's
    snapshot follows the alias within about a second, and a search in flight then has its
    Milvus deadline left."""
    return LIVE_REFRESH_S + settings.serve_milvus_timeout_s


@dataclass
class IndexResult:
    upserted: int = 0
    deleted: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class Indexer:
    def __init__(self, settings: Settings, milvus: MilvusClient, redis_client: redis.Redis,
                 encoder_loader: Callable[[str], Encoder] | None = None):
        self.settings = settings
        self.milvus = milvus
        self.redis = redis_client
        self.keys = Keys(settings)
        # MiniLM items on ONNX int8 (models.retrieval.export.load_item_encoder), batched per call.
        self._load_encoder = encoder_loader or partial(load_item_encoder, data_dir=settings.data_dir)
        self._encoders: dict[str, Encoder] = {}
        self._live: dict[str, str] = {}
        self._padding: dict[str, dict[str, float]] = {}  # per live collection: item_index.legacy_padding
        self._terms: term_index.TermIndex | None = None  # open while a live collection lacks BM25
        self._live_at = 0.0
        # The start-up warm-up and the first batch run on different threads: one must not see
        # a collection the other is still creating, nor load the same encoder twice.
        self._lock = threading.RLock()

    def encoder(self, version: str) -> Encoder:
        with self._lock:
            cached = self._encoders.get(version)
            # A behaviour refresh of the version replaced its graph rows: load them (``outdated``).
            if cached is None or getattr(cached, "outdated", lambda: False)():
                try:
                    self._encoders[version] = self._load_encoder(version)
                except (ValueError, OSError) as exc:  # every event would fail: retry, never dead-letter
                    raise Unavailable(f"the encoder of live collection version {version!r} cannot be loaded: "
                                      f"{exc}") from exc
            return self._encoders[version]

    def warm_up(self) -> None:
        """Load the encoders of the live collections now rather than on the first catalog event:
        the catalog topic is read no faster than it is encoded, and an item's category comes
        with its catalog event (an interaction before it adds its affinity only later)."""
        for version in self.live().values():
            self.encoder(version)

    def live(self, refresh: bool = False) -> dict[str, str]:
        with self._lock:
            if refresh or time.monotonic() - self._live_at > LIVE_REFRESH_S:
                self._live = item_index.live_collections(self.milvus, self.settings)
                if not self._live:  # first catalog event ever: serve the default encoder
                    version = self.settings.encoder_version
                    item_index.create_collection(self.milvus, self.settings, version, self.encoder(version).dim)
                    item_index.point_alias(self.milvus, self.settings, version)
                    self._live = item_index.live_collections(self.milvus, self.settings)
                self._padding = {name: item_index.legacy_padding(self.milvus, name) for name in self._live}
                if not all(item_index.has_bm25(self.milvus, name) for name in self._live):
                    self._terms = self._terms or item_index.terms(self.settings)
                self._live_at = time.monotonic()
            return self._live

    def process(self, events: Sequence[CatalogUpsert | CatalogDelete]) -> IndexResult:
        started = time.perf_counter()
        latest = {event.item_id: event for event in events}  # in-order: the last one wins
        upserts = [e.model_dump(exclude={"schema_version", "event_id", "event_time", "type"})
                   for e in latest.values() if isinstance(e, CatalogUpsert)]
        deletes = [item_id for item_id, e in latest.items() if isinstance(e, CatalogDelete)]
        result = IndexResult(len(upserts), len(deletes))
        # Categories first: the behaviour processor needs an item's category, not its vectors,
        # so a slow or failing encoder does not hold the shoppers' affinities back.
        with self.redis.pipeline(transaction=False) as pipe:
            for item in upserts:
                pipe.hset(self.keys.item_category, item["item_id"], item["category_path"][-1])
            if deletes:
                pipe.hdel(self.keys.item_category, *deletes)
            pipe.execute()
        now_ms = int(time.time() * 1000)  # the version of every write of this batch
        for attempt in range(2):
            try:
                for collection, version in self.live(refresh=attempt > 0).items():
                    t = time.perf_counter()
                    if upserts:
                        vectors = self.encoder(version).encode_items(upserts)
                        result.timings["encode_s"] = result.timings.get("encode_s", 0.0) + time.perf_counter() - t
                        self.milvus.upsert(collection, item_index.rows(upserts, vectors, version, item_text,
                                                                       self._padding.get(collection), now_ms))
                    if deletes:
                        self.milvus.delete(collection, ids=deletes)
                break
            except Exception:  # a collection dropped by a finished reindex: look again once
                if attempt:
                    raise
        if self._terms is not None:
            t = time.perf_counter()
            self._terms.upsert(item_index.content_rows(upserts, item_text, now_ms))
            self._terms.delete(deletes, now_ms)
            result.timings["terms_s"] = time.perf_counter() - t
        result.timings["total_s"] = time.perf_counter() - started
        return result


def processor(resources: Resources) -> Processor:
    """Catalog batches of at most 256 (each is encoded at once); the encoders load at start, so
    that indexing does not lag behind the interactions that need the items' categories."""
    indexer = Indexer(resources.settings, resources.milvus, resources.redis)

    def apply(events) -> Counts:
        result = indexer.process(events)
        if result.upserted or result.deleted:
            resources.milvus_written.set()
        return {"indexed": result.upserted, "deleted": result.deleted}

    return Processor("item_indexer", ("catalog",), apply, batch_size=min(resources.settings.worker_batch_size, 256),
                     start=indexer.warm_up)


def reindex(settings: Settings, version: str, milvus: MilvusClient, encoder: Encoder,
            progress: Callable[[int, int], None] = lambda done, total: None, keep_old: bool = False) -> dict:
    """Build ``version`` beside the serving collection, then point the alias at it (and drop the
    old collection ``drain_s`` later, unless ``keep_old``).

    Running workers see the new collection within LIVE_REFRESH_S and write to both; the copy
    below re-encodes what the serving collection holds, never overwriting a row a worker wrote
    after the copy started.
    """
    source = item_index.serving_collection(milvus, settings)
    target = item_index.create_collection(milvus, settings, version, encoder.dim)
    if source == target:
        raise ValueError(f"version {version!r} is already serving")
    time.sleep(LIVE_REFRESH_S * 1.5)  # let workers start writing the new collection first
    copied = 0
    total = item_index.count(milvus, source) if source else 0
    started_ms = int(time.time() * 1000)
    padding = item_index.legacy_padding(milvus, target)  # a kept collection of this version may predate the schema
    if source:
        for items in item_index.catalog_rows(milvus, source):
            fresher = {hit["item_id"] for hit in milvus.query(
                target, ids=[i["item_id"] for i in items], output_fields=["item_id", "updated_ms"])
                if hit["updated_ms"] >= started_ms}
            todo = [item for item in items if item["item_id"] not in fresher]
            if todo:
                vectors = encoder.encode_items(todo)
                milvus.upsert(target, item_index.rows(todo, vectors, version, item_text, padding))
            copied += len(items)
            progress(copied, total)
    if not item_index.has_bm25(milvus, target):
        backfill_terms(settings, milvus, target)
    milvus.flush(target)
    milvus.load_collection(target)
    item_index.point_alias(milvus, settings, version)
    if source and not keep_old:
        # Searches that resolved the alias (or pinned the collection, as the query handler does
        # for up to its refresh period) before it moved finish on the old collection first: the
        # Milvus 2.3.5 server answers a search whose collection is dropped under it with no hits
        # or an error ("delegator closed"), where Milvus Lite dropped it between two searches.
        time.sleep(drain_s(settings))
        milvus.drop_collection(source)
    return {"from": source, "to": target, "items": copied, "dropped_old": bool(source and not keep_old)}


def drop_versions(settings: Settings, milvus: MilvusClient, versions: Collection[str]) -> list[str]:
    """Drop the live collections of ``versions``, never the one serving; returns their names.
    Every worker writes every live collection (with that version's encoder): a collection
    nothing will serve again costs each catalog event an encode. Workers stop writing a dropped
    one within LIVE_REFRESH_S (``Indexer.process`` looks again when a write fails)."""
    serving = item_index.serving_collection(milvus, settings)
    dropped = [name for name, version in item_index.live_collections(milvus, settings).items()
               if version in versions and name != serving]
    for name in dropped:
        milvus.drop_collection(name)
    return dropped


def refresh_vectors(settings: Settings, milvus: MilvusClient, version: str, item_ids: Sequence[str],
                    encoder: Encoder, batch_size: int = 256) -> dict:
    """Re-encode ``item_ids`` in every live collection of ``version`` with ``encoder`` (the same
    version with a newer behaviour overlay, ``models.retrieval.behaviour``) and upsert their whole
    rows: the content read back from the collection, unchanged, with its own ``updated_ms``, so
    the text, filters and the term index (whose rows carry that version) are what they were;
    only the vector moves. An item a worker rewrote meanwhile is left to the worker's write (its
    encoder reloads the overlay too). Items not indexed yet are skipped: the worker encodes them
    with the overlay when their catalog event comes."""
    written = skipped = 0
    for collection in [name for name, v in item_index.live_collections(milvus, settings).items() if v == version]:
        padding = item_index.legacy_padding(milvus, collection)
        for start in range(0, len(item_ids), batch_size):
            items = item_index.items_by_id(milvus, collection, list(item_ids[start:start + batch_size]))
            if not items:
                continue
            vectors = encoder.encode_items(items)
            read_ms = {item["item_id"]: item["updated_ms"] for item in items}
            now = {hit["item_id"]: hit["updated_ms"] for hit in milvus.query(
                collection, ids=list(read_ms), output_fields=["item_id", "updated_ms"])}
            keep = [k for k, item in enumerate(items) if now.get(item["item_id"]) == read_ms[item["item_id"]]]
            skipped += len(items) - len(keep)
            rows = item_index.rows([items[k] for k in keep], vectors[keep], version, item_text, padding)
            for row, k in zip(rows, keep):
                row["updated_ms"] = items[k]["updated_ms"]  # the content's version, not this write's time
            if rows:
                milvus.upsert(collection, rows)
                written += len(rows)
        milvus.flush(collection)  # unsealed rows are searched by brute force (item_index)
    return {"upserted": written, "skipped_rewritten": skipped}


def backfill_terms(settings: Settings, milvus: MilvusClient, collection: str) -> int:
    """Write what ``collection`` holds into the term index at each row's own version: repairs a
    term index that misses rows (lost or new file) and never reverts a newer write or a delete."""
    terms, written = item_index.terms(settings), 0
    for items in item_index.catalog_rows(milvus, collection):
        written += terms.upsert([item_index.content_rows([item], item_text, item["updated_ms"])[0] for item in items])
    return written
