"""Item vectors in Milvus: one collection per encoder version, served through one alias.

``<prefix>_items`` (the alias) points at the collection serving now; ``<prefix>_items__<version>``
are the collections, each holding the dense vector of its encoder, the text for BM25, scalar
attributes for filtering and the model version.

The lexical route is BM25 in Milvus where the server runs BM25 functions (Milvus 2.5+, Milvus
Lite 3.x: the collection gets a sparse field filled by one), else the term index beside it
(``streams.term_index``, Milvus 2.3/2.4, which silently drop a schema's functions). What a
collection has decides (``has_bm25``), so a search never asks a collection for a route it lacks. Behaviour stats are not here: they change with
every click, and rewriting a row to update them moves the collection's BM25 statistics, and so
the lexical scores of unrelated queries; search reads them from the Feast ``item_stats`` view.
The indexer
writes every live collection (so one being built for a new model never misses an update),
and ``reindex`` builds a new version beside the serving one, then moves the alias: serving
never sees a gap.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from pymilvus import DataType, Function, FunctionType, MilvusClient

from tailbridge.settings import Settings
from tailbridge.streams import term_index
from tailbridge.streams.events import (
    CATEGORY_SEPARATOR,
    INDEXED_DESCRIPTION_BYTES,
    INDEXED_TEXT_BYTES,
    MAX_ATTRIBUTES_BYTES,
    MAX_BRAND_BYTES,
    MAX_CATEGORY_BYTES,
    MAX_CATEGORY_PATH_BYTES,
    MAX_ITEM_ID_BYTES,
    MAX_TITLE_BYTES,
)

CONTENT_FIELDS = ("title", "description", "brand", "category", "category_path", "price", "attributes")
# Collections made when rows still carried behaviour stats require these fields on every write;
# nothing reads them any more (``legacy_padding``).
LEGACY_STATS_FIELDS = ("ctr_24h", "cvr_24h", "purchases_24h")

# pymilvus pings every 10 s even when idle, and a gRPC server on default settings (Milvus Lite)
# answers "too many pings" with GOAWAY, breaking the connection. pymilvus shares one connection
# per address in a process, created with the options of whichever client came first: every
# client in this project passes these.
MILVUS_GRPC_OPTIONS = {"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": False}


def _slug(text: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", text)


def alias_name(settings: Settings) -> str:
    return f"{_slug(settings.topic_prefix)}_items"


def collection_name(settings: Settings, version: str) -> str:
    return f"{alias_name(settings)}__{_slug(version)}"


def connect(settings: Settings) -> MilvusClient:
    return MilvusClient(uri=settings.milvus_uri, timeout=30, grpc_options=MILVUS_GRPC_OPTIONS)


def server_has_bm25(client: MilvusClient) -> bool:
    """Whether the server runs BM25 functions: Milvus 2.5 and later ("v2.5.4"), Milvus Lite 3.x
    ("milvus_lite-3.2.2"); not the 2.3.5 server ("v2.3.5-lite"), which accepts a schema with
    a function and silently drops it."""
    found = re.search(r"(\d+)\.(\d+)", client.get_server_version())
    return bool(found) and (int(found[1]), int(found[2])) >= (2, 5)


def has_bm25(client: MilvusClient, collection: str) -> bool:
    """Whether the collection's text has a BM25 function (else its lexical route is the term index)."""
    return any(f.get("type") == FunctionType.BM25 for f in client.describe_collection(collection).get("functions", []))


def terms(settings: Settings) -> term_index.TermIndex:
    """The term index of this alias (one file shared by every process; see ``streams.term_index``)."""
    return term_index.TermIndex(term_index.path_for(settings, alias_name(settings)))


def _schema(dim: int, bm25: bool = True):
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    # The event contract's limits (``streams.events``): every upsert it accepts fits.
    schema.add_field("item_id", DataType.VARCHAR, is_primary=True, max_length=MAX_ITEM_ID_BYTES)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("text", DataType.VARCHAR, max_length=INDEXED_TEXT_BYTES, enable_analyzer=bm25)
    if bm25:
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_field("title", DataType.VARCHAR, max_length=MAX_TITLE_BYTES)
    schema.add_field("description", DataType.VARCHAR, max_length=INDEXED_DESCRIPTION_BYTES)
    schema.add_field("brand", DataType.VARCHAR, max_length=MAX_BRAND_BYTES)
    schema.add_field("category", DataType.VARCHAR, max_length=MAX_CATEGORY_BYTES)
    schema.add_field("category_path", DataType.VARCHAR, max_length=MAX_CATEGORY_PATH_BYTES)
    schema.add_field("price", DataType.FLOAT)
    schema.add_field("attributes", DataType.VARCHAR, max_length=MAX_ATTRIBUTES_BYTES)
    schema.add_field("model_version", DataType.VARCHAR, max_length=128)
    schema.add_field("updated_ms", DataType.INT64)
    if bm25:
        schema.add_function(Function(name="text_bm25", function_type=FunctionType.BM25,
                                     input_field_names=["text"], output_field_names=["sparse"]))
    return schema


VERSION_PROPERTY = "tailbridge.model_version"  # collection names cannot hold every version string


def create_collection(client: MilvusClient, settings: Settings, version: str, dim: int) -> str:
    name = collection_name(settings, version)
    if not client.has_collection(name):
        bm25 = server_has_bm25(client)
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type="HNSW", metric_type="IP", params={"M": 16, "efConstruction": 200})
        if bm25:
            index.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        # Strong: whoever reads after a write sees it (tests, reindex's freshness check); the
        # query handler's searches ask for Bounded themselves (``SEARCH_CONSISTENCY``).
        client.create_collection(name, schema=_schema(dim, bm25), index_params=index, consistency_level="Strong")
    # Outside the `if`: another process may have created it and not yet labelled it.
    client.alter_collection_properties(name, {VERSION_PROPERTY: version})
    return name


def _version_of(client: MilvusClient, collection: str) -> str | None:
    """None while the collection is being created (no version label yet)."""
    return client.describe_collection(collection)["properties"].get(VERSION_PROPERTY)


def serving_collection(client: MilvusClient, settings: Settings) -> str | None:
    alias = alias_name(settings)
    if alias not in client.list_aliases()["aliases"]:
        return None
    return client.describe_alias(alias)["collection_name"]


def serving_version(client: MilvusClient, settings: Settings) -> str | None:
    """The encoder version the alias points at, or None before anything was indexed."""
    collection = serving_collection(client, settings)
    return _version_of(client, collection) if collection else None


def live_collections(client: MilvusClient, settings: Settings) -> dict[str, str]:
    """collection name -> model version, for every version collection (serving or being built)."""
    prefix = alias_name(settings) + "__"
    versions = {name: _version_of(client, name) for name in client.list_collections() if name.startswith(prefix)}
    return {name: version for name, version in versions.items() if version}


def point_alias(client: MilvusClient, settings: Settings, version: str) -> None:
    alias, target = alias_name(settings), collection_name(settings, version)
    if serving_collection(client, settings) is None:
        client.create_alias(target, alias)
    else:
        client.alter_alias(target, alias)


def legacy_padding(client: MilvusClient, collection: str) -> dict[str, float]:
    """What a write to ``collection`` must add to ``rows``: the stats fields, for a collection
    made before they left Milvus (their values are never read); {} for one made since."""
    names = {field["name"] for field in client.describe_collection(collection)["fields"]}
    return {field: 0.0 for field in LEGACY_STATS_FIELDS if field in names}


def shorten(text: str, limit: int) -> str:
    """The longest start of ``text`` within ``limit`` UTF-8 bytes (never half a character)."""
    return text.encode()[:limit].decode(errors="ignore")


def content_rows(items: Sequence[Mapping[str, Any]], item_text: Callable[[Mapping[str, Any]], str],
                 updated_ms: int) -> list[dict]:
    """What every index holds of an item, whatever its encoder: the text (for BM25), the
    displayed and filtered fields, and the write's version ``updated_ms``."""
    out = []
    for item in items:
        path = list(item.get("category_path") or [])
        out.append({
            "item_id": item["item_id"],
            "text": shorten(item_text(item), INDEXED_TEXT_BYTES),
            "title": item["title"],
            "description": shorten(item.get("description") or "", INDEXED_DESCRIPTION_BYTES),
            "brand": item.get("brand") or "",
            "category": path[-1] if path else "",
            "category_path": CATEGORY_SEPARATOR.join(path),
            "price": float(item.get("price") or 0.0),
            "attributes": orjson.dumps(item.get("attributes") or {}).decode(),
            "updated_ms": updated_ms,
        })
    return out


def rows(items: Sequence[Mapping[str, Any]], vectors: np.ndarray, version: str,
         item_text: Callable[[Mapping[str, Any]], str], padding: Mapping[str, float] | None = None,
         updated_ms: int | None = None) -> list[dict]:
    """Collection rows: the content rows with the encoder's vector and version."""
    now_ms = int(time.time() * 1000) if updated_ms is None else updated_ms
    return [{**row, "vector": vector.astype(np.float32).tolist(), **(padding or {}), "model_version": version}
            for row, vector in zip(content_rows(items, item_text, now_ms), vectors, strict=True)]


def catalog_rows(client: MilvusClient, collection: str, batch_size: int = 512):
    """Iterate the catalog content stored in a collection (the source for reindexing)."""
    iterator = client.query_iterator(collection, batch_size=batch_size, filter="",
                                     output_fields=["item_id", *CONTENT_FIELDS, "updated_ms"])
    try:
        while batch := iterator.next():
            yield [_as_item(row) for row in batch]
    finally:
        iterator.close()


def items_by_id(client: MilvusClient, collection: str, item_ids: Sequence[str]) -> list[dict]:
    """The catalog content a collection holds for these items (those it has), as ``catalog_rows``."""
    if not item_ids:
        return []
    found = client.query(collection, ids=list(item_ids), output_fields=["item_id", *CONTENT_FIELDS, "updated_ms"])
    return [_as_item(row) for row in found]


def _as_item(row: Mapping[str, Any]) -> dict:
    return {
        "item_id": row["item_id"], "title": row["title"], "description": row["description"],
        "brand": row["brand"], "category_path": [p for p in row["category_path"].split(CATEGORY_SEPARATOR) if p],
        "price": row["price"], "attributes": orjson.loads(row["attributes"] or "{}"),
        "updated_ms": row["updated_ms"],
    }


def count(client: MilvusClient, collection: str) -> int:
    return int(client.query(collection, filter="", output_fields=["count(*)"])[0]["count(*)"])


# Searches read at Bounded consistency: they never wait for the server's newest time tick
# (Strong costs ~50-200 ms a search on the 2.3.5 server) and see the index at most the
# server's gracefulTime old (1 s on the embedded server, infra.stack).
SEARCH_CONSISTENCY = "Bounded"


def dense_search(client: MilvusClient, collection: str, vectors: list[list[float]], limit: int, expr: str,
                 output_fields: Sequence[str], timeout: float) -> list[list[dict]]:
    hits = client.search(collection, data=vectors, anns_field="vector", limit=limit, filter=expr,
                         search_params={"metric_type": "IP", "params": {"ef": max(64, 2 * limit)}},
                         output_fields=list(output_fields), timeout=timeout, consistency_level=SEARCH_CONSISTENCY)
    return [list(h) for h in hits]


def lexical_search(client: MilvusClient, collection: str, texts: list[str], limit: int, expr: str,
                   output_fields: Sequence[str], timeout: float, terms: term_index.TermIndex | None = None,
                   filters: term_index.TermFilters = term_index.TermFilters()) -> list[list[dict]]:
    """BM25 hits per text: from the collection's BM25 function, or from ``terms`` (pass the
    term index exactly when ``has_bm25`` is false), with ``filters`` the same filters as ``expr``."""
    if terms is not None:
        return terms.search(texts, limit, filters)
    hits = client.search(collection, data=texts, anns_field="sparse", limit=limit, filter=expr,
                         search_params={"metric_type": "BM25"}, output_fields=list(output_fields),
                         timeout=timeout, consistency_level=SEARCH_CONSISTENCY)
    return [list(h) for h in hits]
