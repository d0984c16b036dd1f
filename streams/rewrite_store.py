"""The rewrite store's writer side: query key -> rewrites, per rewriter version, in Redis.

    tb:<project>:rewrites:<query key>             the live lists search reads (serving.context)
    tb:<project>:rewrites@<version>:<query key>   every version's own lists
    tb:<project>:rewriter@serving                 the version the live lists are a copy of

Writers (the offline fill, the stream's rewrite worker) write a version's lists; writes to the
serving version go to the live lists in the same transaction. ``promote`` makes another version
live: it copies that version's lists over the live ones, deletes live lists the version has no
entry for, then records the version, so an older version's rewrites stay available to
roll back to and a feedback loop can tell which version produced a served rewrite. Query keys
are ``tailbridge.vocab.normalize_query``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import redis

SCAN_BATCH = 500


class RewriteWriter:
    def __init__(self, client: redis.Redis, project: str):
        self._redis = client
        self._live = f"tb:{project}:rewrites:"
        self._versioned = f"tb:{project}:rewrites@"
        self.pointer = f"tb:{project}:rewriter@serving"

    @classmethod
    def from_url(cls, url: str, project: str, timeout_s: float = 5.0) -> RewriteWriter:
        return cls(redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s), project)

    def live_key(self, query_key: str) -> str:
        return self._live + query_key

    def key(self, version: str, query_key: str) -> str:
        return f"{self._versioned}{version}:{query_key}"

    def serving_version(self) -> str | None:
        raw = self._redis.get(self.pointer)
        return raw.decode() if raw else None

    def put_many(self, version: str, rewrites: Mapping[str, list[str]]) -> int:
        """Replace the rewrites of many queries of ``version`` in one transaction (the live
        lists too when ``version`` is serving); an empty list deletes the query's entry."""
        live = version == self.serving_version()
        with self._redis.pipeline(transaction=True) as pipe:
            for query_key, texts in rewrites.items():
                keys = [self.key(version, query_key)] + ([self.live_key(query_key)] if live else [])
                for key in keys:
                    pipe.delete(key)
                    if texts:
                        pipe.rpush(key, *texts)
            pipe.execute()
        return len(rewrites)

    def get(self, version: str, query_key: str) -> list[str]:
        return [raw.decode() for raw in self._redis.lrange(self.key(version, query_key), 0, -1)]

    def has(self, version: str, query_keys: Iterable[str]) -> list[bool]:
        with self._redis.pipeline(transaction=False) as pipe:
            for query_key in query_keys:
                pipe.exists(self.key(version, query_key))
            return [bool(n) for n in pipe.execute()]

    def _query_keys(self, prefix: str) -> list[str]:
        return [raw.decode()[len(prefix):] for raw in self._redis.scan_iter(match=prefix + "*", count=SCAN_BATCH)]

    def count(self, version: str) -> int:
        return len(self._query_keys(f"{self._versioned}{version}:"))

    def promote(self, version: str) -> dict[str, int]:
        """Make ``version``'s lists the live ones (see the module docstring); returns counts."""
        keys = self._query_keys(f"{self._versioned}{version}:")
        stale = set(self._query_keys(self._live)) - set(keys)
        for start in range(0, len(keys), SCAN_BATCH):
            chunk = keys[start:start + SCAN_BATCH]
            with self._redis.pipeline(transaction=False) as pipe:
                for query_key in chunk:
                    pipe.lrange(self.key(version, query_key), 0, -1)
                lists = pipe.execute()
            with self._redis.pipeline(transaction=True) as pipe:
                for query_key, texts in zip(chunk, lists):
                    pipe.delete(self.live_key(query_key))
                    if texts:
                        pipe.rpush(self.live_key(query_key), *texts)
                pipe.execute()
        if stale:
            self._redis.delete(*(self.live_key(k) for k in stale))
        self._redis.set(self.pointer, version)
        return {"live": len(keys), "removed": len(stale)}
