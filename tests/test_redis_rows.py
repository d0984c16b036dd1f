"""The stream processors' Redis writes, against the real Redis: feature rows in Feast's own
layout (byte for byte what ``write_to_online_store`` writes, read back by
``get_online_features``) and the one-script batch of writes (``streams.redis_writes``)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pandas as pd
import pytest
import redis

from tailbridge.feature_repo.online import resolve_online_store
from tailbridge.feature_repo.redis_rows import RedisRows
from tailbridge.feature_repo.store import apply, feature_store
from tailbridge.streams import item_stats
from tailbridge.streams.redis_writes import Applier, Writes

pytestmark = pytest.mark.integration

USER_ROW = {"user_id": "u1", "recent_item_ids": ["a", "b"], "recent_actions": ["click", "purchase"],
            "recent_action_times_ms": [5, 3], "affinity_categories": ["Rugs", "Lamps"], "affinity_weights": [0.75, 0.25],
            "recent_queries": ["wool rug"], "session_id": "s1", "session_queries": 1, "session_clicks": 2,
            "session_carts": 0, "session_purchases": 1}


@pytest.fixture
def store(stack_settings):
    store = feature_store(stack_settings.model_copy(update={"feast_project": f"tbrows_{uuid.uuid4().hex[:6]}"}))
    apply(store)
    yield store
    store.teardown()


@pytest.fixture
def client(stack_settings):
    client = redis.Redis.from_url(resolve_online_store(stack_settings).redis_url)
    yield client
    client.close()


def test_rows_are_what_feast_writes_and_reads(store, client):
    ms = 1_764_470_000_123
    at = datetime.fromtimestamp(ms / 1000, UTC)
    users, items = RedisRows(store, "user_context"), RedisRows(store, "item_stats")
    item_row = item_stats.feature_row("i1", {"clicks:24h:490130": 3, "impressions:24h:490130": 10,
                                             item_stats.LAST_EVENT_FIELD: 490130 * 3_600_000})
    store.write_to_online_store("user_context", pd.DataFrame([USER_ROW | {"event_timestamp": at}]))
    store.write_to_online_store("item_stats", pd.DataFrame([item_row | {"event_timestamp": at}]))
    assert client.hgetall(users.key("u1")) == users.fields(USER_ROW, ms)
    assert client.hgetall(items.key("i1")) == items.fields(item_row, ms)
    assert client.ttl(users.key("u1")) > 0 and users.ttl_s == store.config.online_store.key_ttl_seconds

    client.hset(users.key("u2"), mapping=users.fields(USER_ROW | {"session_id": None}, ms))
    got = store.get_online_features(features=[f"user_context:{name}" for name in USER_ROW if name != "user_id"],
                                    entity_rows=[{"user_id": "u2"}]).to_dict()
    read = {name: values[0] for name, values in got.items()}
    assert read.pop("affinity_weights") == pytest.approx(USER_ROW["affinity_weights"])  # float32 in Feast
    assert read == {name: value for name, value in USER_ROW.items() if name != "affinity_weights"} \
        | {"user_id": "u2", "session_id": None}


def test_rows_refuse_what_they_cannot_encode(stack_settings, store):
    with pytest.raises(ValueError, match="Redis online store"):
        RedisRows(feature_store(stack_settings.model_copy(update={"online_store": "sqlite"})), "user_context")
    with pytest.raises(Exception, match="nope"):
        RedisRows(store, "nope")


def test_writes_apply_every_op_in_one_call_inside_a_transaction(client):
    root = f"tbw:{uuid.uuid4().hex[:8]}"
    client.hset(f"{root}:kept", mapping={"max": 5, "min": 5})
    writes = Writes()
    writes.set(f"{root}:s", b"\x00state", ttl_s=100)
    writes.hset(f"{root}:h", {b"f\x01": b"v\x02", "g": 7})
    writes.hincrby(f"{root}:c", {"a": 2, "b": 3}, ttl_s=100)
    writes.hincrby(f"{root}:c", {"a": 1})
    writes.keep(f"{root}:kept", "max", 9, "max")
    writes.keep(f"{root}:kept", "min", 9, "min")
    writes.keep(f"{root}:kept", "new", 4, "min")
    writes.zadd_nx(f"{root}:z", "q1", 10)
    writes.zadd_nx(f"{root}:z", "q1", 20)  # NX: the first score stays
    writes.sadd(f"{root}:set", ["x", "y"])
    writes.rpush(f"{root}:list", "one")
    writes.rpush(f"{root}:list", "two", ttl_s=100)
    writes.incrby(f"{root}:n", 4)
    writes.hset(f"{root}:big", {f"f{i}": i for i in range(5000)})  # more than one Lua unpack holds
    writes.sadd(f"{root}:bigset", range(9000))
    with client.pipeline() as pipe:
        pipe.watch(f"{root}:s")
        pipe.multi()
        Applier(client).stage(pipe, writes)
        pipe.execute()

    assert client.get(f"{root}:s") == b"\x00state" and 0 < client.ttl(f"{root}:s") <= 100
    assert client.hgetall(f"{root}:h") == {b"f\x01": b"v\x02", b"g": b"7"} and client.ttl(f"{root}:h") == -1
    assert client.hgetall(f"{root}:c") == {b"a": b"3", b"b": b"3"} and client.ttl(f"{root}:c") > 0
    assert client.hgetall(f"{root}:kept") == {b"max": b"9", b"min": b"5", b"new": b"4"}
    assert client.zscore(f"{root}:z", "q1") == 10
    assert client.smembers(f"{root}:set") == {b"x", b"y"}
    assert client.lrange(f"{root}:list", 0, -1) == [b"one", b"two"]
    assert client.get(f"{root}:n") == b"4"
    assert client.hlen(f"{root}:big") == 5000 and client.hget(f"{root}:big", "f4999") == b"4999"
    assert client.scard(f"{root}:bigset") == 9000
    client.delete(*client.keys(f"{root}:*"))


def test_writes_refuse_an_unknown_keep_mode():
    with pytest.raises(ValueError, match="'max' or 'min'"):
        Writes().keep("k", "f", 1, "latest")
