"""The rewrite store's writer side: query key -> rewrites, per rewriter version, in Redis.

    tb:<project>:rewrites:<query key>             the live lists search reads (serving.context)
    tb:<project>:rewriter@live                    hash: query key -> the version its live list came from
    tb:<project>:rewrites@<version>:<query key>   every version's own lists
    tb:<project>:rewriter@serving                 the version the live lists are a copy of

Writers (the offline fill, the stream's rewrite worker) write a version's lists; writes to the
serving version go to the live lists in the same transaction. ``promote`` makes another version
live: it copies that version's lists over the live ones, deletes live lists the version has no
entry for, then records the version, so an older version's rewrites stay available to
roll back to. Each live list's version is written in the same transaction as the list, and
search reads both in one transaction (``live_rewrites``): while a promotion copies thousands of
lists, some queries are served the new version's rewrites and others still the old one's, and
each search records the version it actually used, which the feedback loop attributes the
rewrites' outcomes to. Query keys are ``tailbridge.vocab.normalize_query``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import redis

SCAN_BATCH = 500


def live_prefix(project: str) -> str:
    return f"tb:{project}:rewrites:"


def live_versions_key(project: str) -> str:
    return f"tb:{project}:rewriter@live"


def pointer_key(project: str) -> str:
    return f"tb:{project}:rewriter@serving"


def live_rewrites(pipe, project: str, query_key: str) -> None:
    """Queue, on a transaction pipeline, the reads of a query's live list and its version: the
    pipeline's result is ``[list, version of the list, serving version]`` (the serving version
    stands in for lists written before lists recorded their own)."""
    pipe.lrange(live_prefix(project) + query_key, 0, -1)
    pipe.hget(live_versions_key(project), query_key)
    pipe.get(pointer_key(project))


class RewriteWriter:
    def __init__(self, client: redis.Redis, project: str):
        self._redis = client
        self._live = live_prefix(project)
        self._live_versions = live_versions_key(project)
        self._versioned = f"tb:{project}:rewrites@"
        self.pointer = pointer_key(project)

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

    def live_version(self, query_key: str) -> str | None:
        """The version the query's live list was copied from (None: no live list recorded)."""
        raw = self._redis.hget(self._live_versions, query_key)
        return raw.decode() if raw else None

    def set_live(self, pipe, version: str, query_key: str, texts: list) -> None:
        pipe.delete(self.live_key(query_key))
        if texts:
            pipe.rpush(self.live_key(query_key), *texts)
            pipe.hset(self._live_versions, query_key, version)
        else:
            pipe.hdel(self._live_versions, query_key)

    def put_many(self, version: str, rewrites: Mapping[str, list[str]]) -> int:
        """Replace the rewrites of many queries of ``version`` in one transaction (the live
        lists too when ``version`` is serving); an empty list deletes the query's entry."""
        live = version == self.serving_version()
        with self._redis.pipeline(transaction=True) as pipe:
            for query_key, texts in rewrites.items():
                pipe.delete(self.key(version, query_key))
                if texts:
                    pipe.rpush(self.key(version, query_key), *texts)
                if live:
                    self.set_live(pipe, version, query_key, texts)
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

    def keys(self, version: str) -> list[str]:
        """The query keys ``version`` has rewrites for."""
        return self._query_keys(f"{self._versioned}{version}:")

    def count(self, version: str) -> int:
        return len(self.keys(version))

    def promote(self, version: str) -> dict[str, int]:
        """Make ``version``'s lists the live ones (see the module docstring); returns counts."""
        keys = self.keys(version)
        stale = set(self._query_keys(self._live)) - set(keys)
        for start in range(0, len(keys), SCAN_BATCH):
            chunk = keys[start:start + SCAN_BATCH]
            with self._redis.pipeline(transaction=False) as pipe:
                for query_key in chunk:
                    pipe.lrange(self.key(version, query_key), 0, -1)
                lists = pipe.execute()
            with self._redis.pipeline(transaction=True) as pipe:
                for query_key, texts in zip(chunk, lists):
                    self.set_live(pipe, version, query_key, texts)
                pipe.execute()
        stale_keys = sorted(stale)
        for start in range(0, len(stale_keys), SCAN_BATCH):
            chunk = stale_keys[start:start + SCAN_BATCH]
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(*(self.live_key(k) for k in chunk))
                pipe.hdel(self._live_versions, *chunk)
                pipe.execute()
        self._redis.set(self.pointer, version)
        return {"live": len(keys), "removed": len(stale)}
