"""Item vectors in Milvus: one collection per encoder version, served through one alias.

``<prefix>_items`` (the alias) points at the collection serving now; ``<prefix>_items__<version>``
are the collections, each holding the dense vector of its encoder, the text for BM25, scalar
attributes for filtering and the model version. Behaviour stats are not here: they change with
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


def _schema(dim: int):
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    # The event contract's limits (``streams.events``): every upsert it accepts fits.
    schema.add_field("item_id", DataType.VARCHAR, is_primary=True, max_length=MAX_ITEM_ID_BYTES)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("text", DataType.VARCHAR, max_length=INDEXED_TEXT_BYTES, enable_analyzer=True)
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
    schema.add_function(Function(name="text_bm25", function_type=FunctionType.BM25,
                                 input_field_names=["text"], output_field_names=["sparse"]))
    return schema


VERSION_PROPERTY = "tailbridge.model_version"  # collection names cannot hold every version string


def create_collection(client: MilvusClient, settings: Settings, version: str, dim: int) -> str:
    name = collection_name(settings, version)
    if not client.has_collection(name):
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type="HNSW", metric_type="IP", params={"M": 16, "efConstruction": 200})
        index.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        client.create_collection(name, schema=_schema(dim), index_params=index)
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


def rows(items: Sequence[Mapping[str, Any]], vectors: np.ndarray, version: str,
         item_text: Callable[[Mapping[str, Any]], str], padding: Mapping[str, float] | None = None) -> list[dict]:
    now_ms = int(time.time() * 1000)
    out = []
    for item, vector in zip(items, vectors, strict=True):
        path = list(item.get("category_path") or [])
        out.append({
            "item_id": item["item_id"],
            "vector": vector.astype(np.float32).tolist(),
            "text": shorten(item_text(item), INDEXED_TEXT_BYTES),
            "title": item["title"],
            "description": shorten(item.get("description") or "", INDEXED_DESCRIPTION_BYTES),
            "brand": item.get("brand") or "",
            "category": path[-1] if path else "",
            "category_path": CATEGORY_SEPARATOR.join(path),
            "price": float(item.get("price") or 0.0),
            "attributes": orjson.dumps(item.get("attributes") or {}).decode(),
            **(padding or {}),
            "model_version": version,
            "updated_ms": now_ms,
        })
    return out


def catalog_rows(client: MilvusClient, collection: str, batch_size: int = 512):
    """Iterate the catalog content stored in a collection (the source for reindexing)."""
    iterator = client.query_iterator(collection, batch_size=batch_size, filter="",
                                     output_fields=["item_id", *CONTENT_FIELDS])
    try:
        while batch := iterator.next():
            yield [_as_item(row) for row in batch]
    finally:
        iterator.close()


def _as_item(row: Mapping[str, Any]) -> dict:
    return {
        "item_id": row["item_id"], "title": row["title"], "description": row["description"],
        "brand": row["brand"], "category_path": [p for p in row["category_path"].split(CATEGORY_SEPARATOR) if p],
        "price": row["price"], "attributes": orjson.loads(row["attributes"] or "{}"),
    }


def count(client: MilvusClient, collection: str) -> int:
    return int(client.query(collection, filter="", output_fields=["count(*)"])[0]["count(*)"])
