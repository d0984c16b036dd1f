"""Reindex without wrong answers: while `reindex` moves the serving alias from one encoder
version to another of the same dimension, every search the handler answers embeds its query
with the encoder of the vectors it searches.

The two encoders are a hashed bag of words and the same vectors rotated by a fixed random
orthogonal matrix: a matching pair scores every item exactly as the other pair does, while a
query of one searched against the vectors of the other scores noise. So each dense hit's score
must equal the exact score computed here, whichever version answered."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid

import numpy as np
import pytest
import redis

from tailbridge.feature_repo.online import resolve_online_store
from tailbridge.serving.index import ServingIndex
from tailbridge.serving.metrics import Metrics
from tailbridge.serving.publisher import EventPublisher
from tailbridge.serving.schemas import SearchRequest
from tailbridge.serving.search import SearchService
from tailbridge.streams import item_index
from tailbridge.streams.events import CatalogUpsert
from tailbridge.streams.indexer import Indexer, reindex
from tailbridge.vocab import item_text

pytestmark = pytest.mark.integration

DIM = 32
WORDS = [f"w{i:03d}" for i in range(400)]


class HashedWords:
    """Sum of a fixed random unit vector per word, L2-normalised, optionally rotated."""

    def __init__(self, version: str, rotation: np.ndarray | None = None):
        self.version, self.dim, self.rotation = version, DIM, rotation

    def _vector(self, text: str) -> np.ndarray:
        v = np.zeros(DIM)
        for word in text.lower().split():
            seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            v += np.random.default_rng(seed).standard_normal(DIM)
        v /= np.linalg.norm(v) or 1.0
        return (v @ self.rotation if self.rotation is not None else v).astype(np.float32)

    def encode_items(self, items) -> np.ndarray:
        return np.stack([self._vector(item_text(item)) for item in items])

    def encode_queries(self, queries, user_contexts=None) -> np.ndarray:
        return np.stack([self._vector(q) for q in queries])


def catalog(n: int) -> list[CatalogUpsert]:
    rng = np.random.default_rng(3)
    return [CatalogUpsert(item_id=f"it_{i:03d}", title=" ".join(rng.choice(WORDS, 4, replace=False)),
                          category_path=["Things"], price=10.0 + i, description="") for i in range(n)]


@pytest.fixture
def settings(stack_settings, tmp_path):
    run_id = uuid.uuid4().hex[:8]
    settings = stack_settings.model_copy(update={"topic_prefix": f"tbsr_{run_id}", "feast_project": f"tbsr_{run_id}",
                                                 "encoder_version": "words-a", "data_dir": tmp_path})
    yield settings
    milvus = item_index.connect(settings)
    for name in item_index.live_collections(milvus, settings):
        milvus.drop_collection(name)


def test_no_search_mixes_two_encoders_of_one_dimension_while_the_alias_moves(settings):
    a = HashedWords("words-a")
    b = HashedWords("words-b", np.linalg.qr(np.random.default_rng(11).standard_normal((DIM, DIM)))[0])
    encoders = {"words-a": a, "words-b": b}
    items = catalog(150)
    milvus = item_index.connect(settings)
    r = redis.Redis.from_url(resolve_online_store(settings).redis_url)
    Indexer(settings, milvus, r, encoder_loader=encoders.__getitem__).process(items)
    milvus.flush(item_index.alias_name(settings))

    item_vectors = {item.item_id: vector for item, vector in zip(items, a.encode_items([i.model_dump() for i in items]))}
    queries = [" ".join(item.title.split()[:2]) for item in items[:40]]
    expected = {q: {item: float(vector @ a.encode_queries([q])[0]) for item, vector in item_vectors.items()}
                for q in queries}
    # The check can fail: a query of one version against the other's vectors scores differently.
    mixed = b.encode_items([items[0].model_dump()])[0] @ a.encode_queries([queries[0]])[0]
    assert abs(mixed - expected[queries[0]][items[0].item_id]) > 0.1

    metrics = Metrics()
    publisher = EventPublisher(settings, metrics)
    service = SearchService(settings, metrics, ServingIndex(settings, encoders.__getitem__), publisher,
                            None, None, None)
    done = threading.Event()
    switched: list[float] = []

    def move_alias() -> None:
        try:
            reindex(settings, "words-b", item_index.connect(settings), b)
            switched.append(time.monotonic())
        finally:
            done.set()

    def keep_searching() -> bool:  # until 3 s after the switch
        return not done.is_set() or bool(switched) and time.monotonic() < switched[0] + 3.0

    async def search_until_done(worker: int) -> list[tuple[float, str, list[tuple[str, float]], str]]:
        answers, n = [], worker
        while keep_searching():
            q = queries[n % len(queries)]
            n += 1
            try:
                body = await service.search(SearchRequest(query=q, k=10, explain=True))
            except Exception as exc:  # any failure is a gap in serving
                answers.append((time.monotonic(), "error", [], repr(exc)))
                continue
            answers.append((time.monotonic(), body.model_versions["encoder"],
                            [(h.item_id, h.parts.dense_score) for h in body.results if h.parts.dense_score is not None],
                            q))
        return answers

    async def run() -> list:
        thread = threading.Thread(target=move_alias)
        thread.start()
        try:
            return [a for answers in await asyncio.gather(*(search_until_done(w) for w in range(4))) for a in answers]
        finally:
            await asyncio.to_thread(thread.join)

    try:
        answers = asyncio.run(run())
    finally:
        service.close()
        publisher.close()

    assert switched, "the reindex did not finish"
    errors = [a for a in answers if a[1] == "error"]
    assert errors == []
    assert {version for _, version, _, _ in answers} == {"words-a", "words-b"}
    wrong = [(version, q, item, score) for _, version, hits, q in answers for item, score in hits
             if abs(score - expected[q][item]) > 1e-3]
    assert wrong == [], wrong[:5]
    empty = [(version, round(at - switched[0], 2), q) for at, version, hits, q in answers if not hits]
    assert empty == [], f"{len(empty)} of {len(answers)} answers without a dense hit: {empty[:5]}"
    # The handler follows the alias within its refresh period, not 10 s later.
    late = [at - switched[0] for at, version, _, _ in answers if version == "words-a" and at > switched[0]]
    assert max(late, default=0.0) < 2.5
