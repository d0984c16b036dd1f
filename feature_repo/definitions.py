"""Feast definitions: the entities, sources and feature views of tailbridge, in one file.

The stream processors write these views online in Feast's Redis layout, inside their own
Redis writes (``feature_repo.redis_rows``; one view per processor, because every column of a
view is written each time); the parquet sources are where the offline copies and training
data live, relative to the data dir. Timestamps written per entity must strictly increase:
Feast's Redis store silently drops a second write with the same event timestamp.
"""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource
from feast.types import Array, Float32, Int64, String
from feast.value_type import ValueType

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
              description="A shopper (logged-in id or the frontend's anonymous id).")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING, description="A catalog product.")
query = Entity(name="query", join_keys=["query_key"], value_type=ValueType.STRING,
               description="A search query, normalised by streams.events.normalize_query.")


def _parquet(name: str) -> FileSource:
    return FileSource(name=f"{name}_source", path=f"offline/{name}.parquet", timestamp_field="event_timestamp")


user_context = FeatureView(
    name="user_context",
    entities=[user],
    ttl=timedelta(days=7),
    schema=[
        Field(name="recent_item_ids", dtype=Array(String), description="Last 50 interacted items, newest first."),
        Field(name="recent_actions", dtype=Array(String), description="Action per recent item."),
        Field(name="recent_action_times_ms", dtype=Array(Int64), description="Epoch ms per recent item."),
        # Two parallel arrays, not a Map: a DataFrame write turns dicts with different keys
        # into one struct of all keys, filling the gaps with None.
        Field(name="affinity_categories", dtype=Array(String), description="Categories, strongest first."),
        Field(name="affinity_weights", dtype=Array(Float32), description="Time-decayed affinity, sums to 1."),
        Field(name="recent_queries", dtype=Array(String), description="Last normalised queries, newest first."),
        Field(name="session_id", dtype=String),
        Field(name="session_queries", dtype=Int64),
        Field(name="session_clicks", dtype=Int64),
        Field(name="session_carts", dtype=Int64),
        Field(name="session_purchases", dtype=Int64),
    ],
    source=_parquet("user_context"),
    online=True,
    description="Real-time shopper context from query and interaction events.",
)

item_stats = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=timedelta(days=2),
    schema=[
        *(Field(name=f"{action}_{window}", dtype=Int64)
          for window in ("1h", "24h", "7d") for action in ("impressions", "clicks", "carts", "purchases")),
        Field(name="ctr_24h", dtype=Float32, description="Smoothed click-through rate."),
        Field(name="cvr_24h", dtype=Float32, description="Smoothed purchase rate per click."),
        Field(name="cart_rate_7d", dtype=Float32, description="Smoothed add-to-cart rate per click over 7 days."),
        Field(name="cvr_7d", dtype=Float32, description="Smoothed purchase rate per click over 7 days."),
    ],
    source=_parquet("item_stats"),
    online=True,
    description="Per-item behaviour over sliding windows.",
)

query_stats = FeatureView(
    name="query_stats",
    entities=[query],
    ttl=timedelta(days=2),
    schema=[
        Field(name="searches_24h", dtype=Int64),
        Field(name="clicks_24h", dtype=Int64),
        Field(name="purchases_24h", dtype=Int64),
        Field(name="ctr_24h", dtype=Float32, description="Smoothed click-through rate."),
    ],
    source=_parquet("query_stats"),
    online=True,
    description="Per-query behaviour: how often it is asked and how well it converts.",
)

ENTITIES = [user, item, query]
FEATURE_VIEWS = [user_context, item_stats, query_stats]
