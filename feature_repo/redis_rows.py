"""Feature rows as Feast's Redis online store keeps them, for writers that stage them on their
own Redis pipeline (the stream processors: in the same transaction as the state they come from).

``FeatureStore.write_to_online_store`` turns a DataFrame into Arrow, then into protobuf values,
reads each entity's stored timestamp (one round trip) and writes in another: about 40 ms per
200 rows on the worker, more than its Redis transaction. ``RedisRows`` encodes a row straight
into the hash Feast reads (``get_online_features`` sees no difference): the key is the
serialized entity key plus the project, each feature a murmur3 field holding a ``Value``
proto, ``_ts:<view>`` the row's timestamp. Feast skips a write whose timestamp is not newer
than the stored one; a writer that stages rows itself must give each entity strictly
increasing timestamps (the behaviour processor does: ``written_ms``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from feast import FeatureStore
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3, compute_versioned_name
from feast.infra.online_stores.redis import RedisOnlineStoreConfig
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import DoubleList, FloatList, Int64List, StringList, Value
from feast.type_map import feast_value_type_to_python_type
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp

# Feast value type -> the Value proto holding a Python value of it (the types our views use).
_VALUES: dict[ValueType, Callable[[Any], Value]] = {
    ValueType.STRING: lambda v: Value(string_val=v),
    ValueType.INT64: lambda v: Value(int64_val=v),
    ValueType.FLOAT: lambda v: Value(float_val=v),
    ValueType.DOUBLE: lambda v: Value(double_val=v),
    ValueType.STRING_LIST: lambda v: Value(string_list_val=StringList(val=v)),
    ValueType.INT64_LIST: lambda v: Value(int64_list_val=Int64List(val=v)),
    ValueType.FLOAT_LIST: lambda v: Value(float_list_val=FloatList(val=v)),
    ValueType.DOUBLE_LIST: lambda v: Value(double_list_val=DoubleList(val=v)),
}


class RedisRows:
    """One feature view's rows in Feast's Redis layout (its store must use the Redis online store)."""

    def __init__(self, store: FeatureStore, view_name: str):
        config = store.config
        if not isinstance(config.online_store, RedisOnlineStoreConfig):
            raise ValueError(f"RedisRows needs Feast's Redis online store, not {type(config.online_store).__name__}")
        view = store.get_feature_view(view_name)
        name = compute_versioned_name(view, config.registry.enable_online_feature_view_versioning)
        [self.join_key] = view.join_keys
        self.project = config.project.encode()
        self.key_version = config.entity_key_serialization_version
        self.ttl_s = config.online_store.key_ttl_seconds  # Feast expires the whole key after each write
        self.timestamp_field = f"_ts:{name}".encode()
        unsupported = [f.name for f in view.features if f.dtype.to_value_type() not in _VALUES]
        if unsupported:
            raise ValueError(f"RedisRows cannot encode the types of {view_name} features {unsupported}")
        self.features = [(f.name, _mmh3(f"{name}:{f.name}"), _VALUES[f.dtype.to_value_type()]) for f in view.features]
        self.key = lru_cache(maxsize=100_000)(self._key)  # the same users and items come again and again

    def _key(self, entity: str) -> bytes:
        entity_key = EntityKey(join_keys=[self.join_key], entity_values=[Value(string_val=entity)])
        return serialize_entity_key(entity_key, entity_key_serialization_version=self.key_version) + self.project

    def fields(self, row: Mapping[str, Any], timestamp_ms: int) -> dict[bytes, bytes]:
        """The hash fields of one row (every feature of the view; a None value is written empty,
        as Feast writes a missing value)."""
        seconds, ms = divmod(timestamp_ms, 1000)
        out = {self.timestamp_field: Timestamp(seconds=seconds, nanos=ms * 1_000_000).SerializeToString()}
        for name, field, value in self.features:
            out[field] = (Value() if row[name] is None else value(row[name])).SerializeToString()
        return out


_PLAIN = frozenset(f"{kind}_val" for kind in ("double", "float", "int32", "int64", "bool", "string", "bytes"))
_PLAIN_LISTS = frozenset(f"{kind}_list_val" for kind in ("double", "float", "int32", "int64", "bool", "string", "bytes"))


class RowReader:
    """Reading some features of a view's rows back: the fields of one HMGET (the row's timestamp
    first) and their decoding, as ``get_online_features`` decodes them. Search reads its rows
    this way (``serving.context``), the drift monitor too (``streams.monitor.features``)."""

    def __init__(self, rows: RedisRows, names: Sequence[str]):
        by_name = {name: field for name, field, _ in rows.features}
        self.rows, self.names = rows, list(names)
        self.fields = [rows.timestamp_field, *(by_name[name] for name in self.names)]

    def decode(self, values: Sequence[bytes | None]) -> dict[str, Any] | None:
        """None when the entity has no row (as Feast: no timestamp field, no row)."""
        if not values[0]:
            return None
        return {name: self.value(raw) if raw else None for name, raw in zip(self.names, values[1:])}

    @staticmethod
    def value(raw: bytes) -> Any:
        """One field's Python value (None for a value Feast wrote empty); raises on bytes that are
        not a ``Value`` proto. Plain numbers, strings and their lists are read straight off the
        proto, which is what Feast's conversion returns for them at a third of its CPU (search
        decodes 250 of them per request); every other kind goes through Feast's."""
        proto = Value.FromString(raw)
        kind = proto.WhichOneof("val")
        if kind in _PLAIN:
            return getattr(proto, kind)
        if kind in _PLAIN_LISTS:
            return list(getattr(proto, kind).val)
        return feast_value_type_to_python_type(proto)

    @staticmethod
    def timestamp_ms(raw: bytes) -> int:
        """The row's timestamp field as epoch milliseconds; raises on bytes that are not one."""
        stamp = Timestamp.FromString(raw)
        return stamp.seconds * 1000 + stamp.nanos // 1_000_000
