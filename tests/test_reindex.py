"""Blue/green reindex on a real Milvus server: the new encoder version is built beside
the serving one and the alias moves without a moment where search has nothing to serve."""

import threading
import uuid

import numpy as np
import pytest
import redis
from pymilvus import DataType

from tailbridge.feature_repo.online import resolve_online_store
from tailbridge.models.retrieval.encoders import MiniLMEncoder
from tailbridge.streams import item_index
from tailbridge.streams.events import CatalogUpsert
from tailbridge.streams.indexer import Indexer, reindex

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def minilm():
    import torch

    torch.set_num_threads(1)
    return MiniLMEncoder()


@pytest.fixture
def settings(stack_settings):
    run_id = uuid.uuid4().hex[:8]
    settings = stack_settings.model_copy(update={"topic_prefix": f"tbr_{run_id}", "feast_project": f"tbr_{run_id}"})
    yield settings
    milvus = item_index.connect(settings)
    for name in item_index.live_collections(milvus, settings):
        milvus.drop_collection(name)


def products(n: int) -> list[CatalogUpsert]:
    kinds = ["Velvet Sofa", "Oak Coffee Table", "Wool Area Rug", "Brass Floor Lamp"]
    return [CatalogUpsert(item_id=f"item_{i:03d}", title=f"Harlow {kinds[i % 4]} {i}",
                          category_path=["Home", kinds[i % 4].split()[-1]], price=100.0 + i) for i in range(n)]


def test_reindex_switches_serving_without_a_gap(settings, minilm):
    milvus = item_index.connect(settings)
    r = redis.Redis.from_url(resolve_online_store(settings).redis_url)
    indexer = Indexer(settings, milvus, r, encoder_loader=lambda version: minilm)
    indexer.process(products(120))
    old = item_index.serving_collection(milvus, settings)
    assert item_index.serving_version(milvus, settings) == settings.encoder_version

    new_version = "minilm-l6-v2-blue-green-test"
    new_encoder = MiniLMEncoder(version=new_version, max_length=16)  # a different model: shorter inputs
    query = minilm.encode_queries(["wool rug"])[0].tolist()
    failures, searches, stop = [], [0], threading.Event()

    def search_continuously():
        client = item_index.connect(settings)
        while not stop.is_set():
            try:
                hits = client.search(item_index.alias_name(settings), data=[query], anns_field="vector", limit=5,
                                     output_fields=["item_id"])[0]
                searches[0] += 1
                if len(hits) < 5:
                    failures.append(f"only {len(hits)} hits")
            except Exception as exc:  # any error is a gap in serving
                failures.append(repr(exc))

    searcher = threading.Thread(target=search_continuously)
    searcher.start()
    try:
        progress = []
        result = reindex(settings, new_version, milvus, new_encoder, progress=lambda d, t: progress.append((d, t)))
    finally:
        stop.set()
        searcher.join()

    assert failures == [] and searches[0] > 0
    assert result == {"from": old, "to": item_index.collection_name(settings, new_version), "items": 120,
                      "dropped_old": True}
    assert progress[-1] == (120, 120)
    assert item_index.serving_version(milvus, settings) == new_version
    assert not milvus.has_collection(old)
    assert item_index.count(milvus, item_index.alias_name(settings)) == 120
    row = milvus.query(item_index.alias_name(settings), ids=["item_002"], output_fields=["vector", "model_version"])[0]
    expected = new_encoder.encode_items([products(3)[2].model_dump()])[0]
    assert row["model_version"] == new_version
    assert np.dot(np.asarray(row["vector"]), expected) == pytest.approx(1.0, abs=1e-4)  # re-encoded, not copied

    with pytest.raises(ValueError, match="already serving"):
        reindex(settings, new_version, milvus, new_encoder)


def test_collections_made_when_rows_carried_stats_keep_working(settings, minilm, monkeypatch):
    """Collections from before behaviour stats left Milvus require the stats fields on every
    write: the indexer and reindex still write them (values never read), and reindex moves
    serving to a collection without them."""
    milvus = item_index.connect(settings)
    current_schema = item_index._schema

    def schema_with_stats(dim, bm25=True):
        schema = current_schema(dim, bm25)
        for field in item_index.LEGACY_STATS_FIELDS:
            schema.add_field(field, DataType.FLOAT)
        return schema

    monkeypatch.setattr(item_index, "_schema", schema_with_stats)
    old = item_index.create_collection(milvus, settings, settings.encoder_version, minilm.dim)
    item_index.point_alias(milvus, settings, settings.encoder_version)
    monkeypatch.undo()
    assert item_index.legacy_padding(milvus, old) == dict.fromkeys(item_index.LEGACY_STATS_FIELDS, 0.0)

    r = redis.Redis.from_url(resolve_online_store(settings).redis_url)
    Indexer(settings, milvus, r, encoder_loader=lambda version: minilm).process(products(8))
    assert item_index.count(milvus, old) == 8

    result = reindex(settings, "minilm-l6-v2-without-stats", milvus, minilm)
    assert result["items"] == 8 and item_index.legacy_padding(milvus, result["to"]) == {}
    terms = None if item_index.has_bm25(milvus, result["to"]) else item_index.terms(settings)
    [hits] = item_index.lexical_search(milvus, result["to"], ["wool rug"], 2, "", ["item_id"], 10, terms)
    assert {hit["entity"]["item_id"] for hit in hits} == {"item_002", "item_006"}
