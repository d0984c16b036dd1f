"""A batch's Redis writes as one script call.

A behaviour batch of 500 events makes about 2,000 small writes (counter increments, expiries,
user states, feature rows). Sent as commands, redis-py packs and parses each one: that was
about half of the batch's time. ``Writes`` collects them as a flat argument list instead and
``stage`` queues them on a pipeline (or inside a MULTI) as one EVALSHA of ``_APPLY``, which
runs them in order inside Redis. Keys go in KEYS (so the script declares what it touches);
each op names its key by index.

Ops (all but ``keep`` are the Redis command of the same name):
    set k v | hset k field value... | hincrby k field n... | keep k field value max|min |
    zadd_nx k score member | sadd k member... | rpush k value | incrby k n | expire k seconds
``keep`` stores the value if the field is empty, or if it is larger ('max') / smaller ('min')
than the stored number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import redis

_APPLY = """
local i, n = 1, #ARGV
while i <= n do
  local op, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
  if op == 'set' then
    redis.call('SET', key, ARGV[i + 2]); i = i + 3
  elseif op == 'expire' then
    redis.call('EXPIRE', key, ARGV[i + 2]); i = i + 3
  elseif op == 'hset' or op == 'hincrby' or op == 'sadd' then
    local count = tonumber(ARGV[i + 2])
    if op == 'hset' then
      redis.call('HSET', key, unpack(ARGV, i + 3, i + 2 + 2 * count)); i = i + 3 + 2 * count
    elseif op == 'sadd' then
      redis.call('SADD', key, unpack(ARGV, i + 3, i + 2 + count)); i = i + 3 + count
    else
      for j = i + 3, i + 1 + 2 * count, 2 do redis.call('HINCRBY', key, ARGV[j], ARGV[j + 1]) end
      i = i + 3 + 2 * count
    end
  elseif op == 'keep' then
    local current = tonumber(redis.call('HGET', key, ARGV[i + 2]) or '')
    local value = tonumber(ARGV[i + 3])
    if current == nil or (ARGV[i + 4] == 'max' and value > current) or (ARGV[i + 4] == 'min' and value < current) then
      redis.call('HSET', key, ARGV[i + 2], ARGV[i + 3])
    end
    i = i + 5
  elseif op == 'zadd_nx' then
    redis.call('ZADD', key, 'NX', ARGV[i + 2], ARGV[i + 3]); i = i + 4
  elseif op == 'rpush' then
    redis.call('RPUSH', key, ARGV[i + 2]); i = i + 3
  elseif op == 'incrby' then
    redis.call('INCRBY', key, ARGV[i + 2]); i = i + 3
  else
    return redis.error_reply('unknown op ' .. tostring(op))
  end
end
return n
"""
# Lua's unpack has a stack limit (LUAI_MAXCSTACK, 8000): longer hashes and sets go in parts.
_MAX_UNPACK = 4000

Value = bytes | str | int | float


class Writes:
    def __init__(self) -> None:
        self.keys: list[bytes | str] = []
        self.args: list[Value] = []
        self._index: dict[bytes | str, int] = {}

    def _op(self, op: str, key: bytes | str) -> None:
        index = self._index.get(key)
        if index is None:
            self.keys.append(key)
            index = self._index[key] = len(self.keys)  # Lua counts from 1
        self.args += (op, index)

    def set(self, key: bytes | str, value: Value, ttl_s: int | None = None) -> None:
        self._op("set", key)
        self.args.append(value)
        self.expire(key, ttl_s)

    def expire(self, key: bytes | str, ttl_s: int | None) -> None:
        if ttl_s:
            self._op("expire", key)
            self.args.append(ttl_s)

    def hset(self, key: bytes | str, mapping: Mapping[bytes | str, Value], ttl_s: int | None = None) -> None:
        self._pairs("hset", key, list(mapping.items()))
        self.expire(key, ttl_s)

    def hincrby(self, key: bytes | str, increments: Mapping[str, int], ttl_s: int | None = None) -> None:
        self._pairs("hincrby", key, list(increments.items()))
        self.expire(key, ttl_s)

    def _pairs(self, op: str, key: bytes | str, pairs: list) -> None:
        for start in range(0, len(pairs), _MAX_UNPACK // 2):
            part = pairs[start:start + _MAX_UNPACK // 2]
            self._op(op, key)
            self.args.append(len(part))
            for field, value in part:
                self.args += (field, value)

    def keep(self, key: bytes | str, field: str, value: int, mode: str) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"keep mode is 'max' or 'min', not {mode!r}")
        self._op("keep", key)
        self.args += (field, value, mode)

    def zadd_nx(self, key: bytes | str, member: Value, score: int | float) -> None:
        self._op("zadd_nx", key)
        self.args += (score, member)

    def sadd(self, key: bytes | str, members: Iterable[Value]) -> None:
        members = list(members)
        for start in range(0, len(members), _MAX_UNPACK):
            part = members[start:start + _MAX_UNPACK]
            self._op("sadd", key)
            self.args.append(len(part))
            self.args += part

    def rpush(self, key: bytes | str, value: Value, ttl_s: int | None = None) -> None:
        self._op("rpush", key)
        self.args.append(value)
        self.expire(key, ttl_s)

    def incrby(self, key: bytes | str, amount: int) -> None:
        self._op("incrby", key)
        self.args.append(amount)


class Applier:
    """The script, registered once per client: ``stage(pipe, writes)`` queues a batch's writes."""

    def __init__(self, client: redis.Redis):
        self._script = client.register_script(_APPLY)

    def stage(self, pipe, writes: Writes) -> None:
        if writes.args:
            self._script(keys=writes.keys, args=writes.args, client=pipe)
