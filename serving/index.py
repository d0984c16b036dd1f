"""The item index as search sees it: which collection serves now, the query encoder whose
vectors it holds, and the two searches on it (dense vectors, lexical terms).

A reindex moves the alias from one encoder version's collection to another's and drops the
old one. A search must never embed its query with one encoder and search the vectors of the
other (the scores would be noise), however the alias moves meanwhile. So a search works on a
``Serving`` snapshot, which pins a collection *by name* together with the encoder version it
was labelled with and that version's loaded encoders: the query is embedded with the
snapshot's encoders and both searches go to the snapshot's collection, never to the alias.
The snapshot is re-read in the background every ``REFRESH_S`` (one alias and one collection
lookup, not per search), and a new version's encoders are loaded before the snapshot switches
to it, so searches go on with the old pair meanwhile. If the pinned collection is gone (dropped
by the reindex that moved the alias), the search re-reads the alias at once and runs again on
the new pair (``SearchService``).

Milvus calls are blocking gRPC calls: they run on a thread pool of their own, never on the
event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from pymilvus import MilvusClient
from pymilvus.client.utils import SciPyHelper

from tailbridge.models.retrieval.behaviour import overlay_stamp
from tailbridge.models.retrieval.encoders import MINILM_VERSION, Encoder, retriever_dir
from tailbridge.serving.models import EncoderPool, load_query_encoder
from tailbridge.settings import Settings
from tailbridge.streams import item_index
from tailbridge.streams.term_index import TermFilters

log = logging.getLogger(__name__)

OUTPUT_FIELDS = ["item_id", "title", "brand", "category", "category_path", "price"]
REFRESH_S = 1.0  # how often the alias is re-read; a search never mixes versions, this only bounds how long the old one serves
ENCODER_THREADS = 2  # query encoders kept loaded, one per encoding thread: about one per core
# Blocking engine calls in flight at once. Few: each thread also does Python work (requests,
# results) under the GIL, and many of them starve the event loop, whose reads have 50 ms
# deadlines; calls beyond wait in the pool's queue, which costs no CPU.
MILVUS_THREADS = 8
KEPT_VERSIONS = 2  # encoder pools kept loaded: the serving one and the one before (searches may still hold it)


# pymilvus checks for scipy.sparse on its first search by executing the module afresh, unguarded:
# the first searches of several threads at once then fail half way ("scipy.sparse._lil has no
# attribute lil_array"). Run the check once, here, before any thread searches.
SciPyHelper.is_scipy_sparse(None)


class SearchUnavailable(Exception):
    """Search cannot answer at all (the item index is unreachable or empty)."""


@dataclass(frozen=True)
class Serving:
    """A collection, the encoders of the version its vectors were made with, and where its
    lexical route is: its own BM25 field, or the term index beside it (``terms``)."""

    collection: str
    version: str
    encoders: EncoderPool
    terms: item_index.term_index.TermIndex | None = None


class ServingIndex:
    def __init__(self, settings: Settings, load_encoder: Callable[[str], Encoder] | None = None,
                 encoder_threads: int = ENCODER_THREADS):
        self.settings = settings
        self._load = load_encoder or (lambda version: load_query_encoder(version, settings))
        self._encoder_threads = encoder_threads
        self._threads = ThreadPoolExecutor(max_workers=MILVUS_THREADS, thread_name_prefix="milvus")
        self._client: MilvusClient | None = None
        self._pools: dict[tuple[str, tuple[int, int] | None], EncoderPool] = {}  # by version and overlay
        self.serving: Serving | None = None
        self._checked = 0.0
        self._lock: asyncio.Lock | None = None
        self._background: asyncio.Task | None = None
        self._terms: item_index.term_index.TermIndex | None = None  # one file per alias, whatever the version

    @property
    def version(self) -> str | None:
        return self.serving.version if self.serving else None

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._threads, partial(fn, *args, **kwargs))

    def _connect(self) -> MilvusClient:
        if self._client is None:
            try:
                self._client = MilvusClient(uri=self.settings.milvus_uri, timeout=self.settings.serve_milvus_timeout_s,
                                            grpc_options=item_index.MILVUS_GRPC_OPTIONS)
            except Exception as exc:
                raise SearchUnavailable(f"Milvus at {self.settings.milvus_uri} is unreachable ({exc}); "
                                        "search needs the item index") from None
        return self._client

    def _resolve(self) -> tuple[str, str, bool]:
        """(collection, version, has BM25) behind the alias now: the version read from that
        very collection, so the pair cannot straddle an alias move."""
        client = self._connect()
        try:
            collection = item_index.serving_collection(client, self.settings)
            version = client.describe_collection(collection)["properties"].get(item_index.VERSION_PROPERTY) \
                if collection else None
            bm25 = item_index.has_bm25(client, collection) if version else True
        except Exception as exc:
            raise SearchUnavailable(f"Milvus at {self.settings.milvus_uri} did not answer ({exc}); "
                                    "search needs the item index") from None
        if collection is None or version is None:
            raise SearchUnavailable(f"no items indexed yet (no collection behind alias "
                                    f"{item_index.alias_name(self.settings)!r}): run `tailbridge worker` and publish "
                                    "the catalog")
        return collection, version, bm25

    def _visible(self, collection: str) -> bool:
        """Whether a search (Bounded consistency) sees every row of ``collection`` yet."""
        def rows(consistency: str) -> int:
            found = self._connect().query(collection, filter="", output_fields=["count(*)"],
                                          consistency_level=consistency, timeout=self.settings.serve_milvus_timeout_s)
            return int(found[0]["count(*)"])

        try:
            return rows(item_index.SEARCH_CONSISTENCY) >= rows("Strong")
        except Exception:  # noqa: BLE001  not answering: not ready to serve from
            return False

    async def current(self) -> Serving:
        """The snapshot to search with; re-read in the background when older than REFRESH_S."""
        if self.serving is None:
            return await self.refresh()
        stale = time.monotonic() - self._checked > REFRESH_S
        if stale and (self._background is None or self._background.done()):
            self._background = asyncio.create_task(self._refresh_quietly())
        return self.serving

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except SearchUnavailable as exc:  # searches on the current snapshot report it if it matters
            log.debug("serving version not re-read: %s", exc)

    async def refresh(self, force: bool = False) -> Serving:
        """Read the alias now (one at a time: callers that waited get the result of the read
        that finished meanwhile) and load the encoders of a new version before switching.
        A new collection is switched to once searches see all its rows (a search reads at
        Bounded consistency, up to a second behind the last write: right after the alias moved
        it could find nothing), unless ``force``: the current one is gone."""
        asked = time.monotonic()
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self.serving is not None and self._checked >= asked and not force:
                return self.serving
            try:
                collection, version, bm25 = await self._run(self._resolve)
                moved = self.serving is not None and collection != self.serving.collection
                if moved and not force and not await self._run(self._visible, collection):
                    return self.serving
            finally:
                self._checked = time.monotonic()  # a failing Milvus is asked again after REFRESH_S, not per search
            # A behaviour refresh of the version (a new overlay, ``models.retrieval.behaviour``) is
            # loaded like a new version, beside the current pool, and switched to once loaded.
            key = (version, overlay_stamp(retriever_dir(version)) if version != MINILM_VERSION else None)
            pool = self._pools.get(key)
            if pool is None:
                try:
                    pool = await EncoderPool.load(version, self._load, self._encoder_threads,
                                                  self.settings.serve_query_cache_size)
                except (OSError, ValueError) as exc:
                    raise SearchUnavailable(f"cannot load the query encoder of the serving version {version!r}: "
                                            f"{exc}") from None
                self._pools[key] = pool
                for old in list(self._pools)[:-KEPT_VERSIONS]:
                    self._pools.pop(old).close()
            if not bm25 and self._terms is None:
                self._terms = item_index.terms(self.settings)
            self.serving = Serving(collection, version, pool, None if bm25 else self._terms)
            return self.serving

    async def dense(self, serving: Serving, vectors: np.ndarray, limit: int, expr: str) -> list[list[dict]]:
        return await self._search(item_index.dense_search, self._connect(), serving.collection, vectors.tolist(),
                                  limit, expr, OUTPUT_FIELDS, self.settings.serve_milvus_timeout_s)

    async def lexical(self, serving: Serving, texts: list[str], limit: int, expr: str,
                      filters: TermFilters) -> list[list[dict]]:
        """BM25 hits per text: the collection's own, or the term index's (the same filters as SQL)."""
        if not texts:
            return []
        return await self._search(item_index.lexical_search, self._connect(), serving.collection, texts, limit,
                                  expr, OUTPUT_FIELDS, self.settings.serve_milvus_timeout_s, serving.terms, filters)

    async def _search(self, search: Callable[..., list[list[dict]]], *args: Any) -> list[list[dict]]:
        try:
            return await self._run(search, *args)
        except Exception as exc:
            raise SearchUnavailable(f"Milvus at {self.settings.milvus_uri} failed the search ({type(exc).__name__}: "
                                    f"{exc}); search needs the item index") from None

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()
        if self._terms is not None:
            self._terms.close()
