"""Rewrites for new rare queries, generated as they show up on the stream.

Its own consumer group (``<prefix>.rewriter``) on the queries topic, so it neither slows nor
shares offsets with the stream worker. A searched query whose key is rare (seen at most
``rewrite_rare_max_seen`` times, counted in Redis over ``rewrite_seen_ttl_s``: the long tail, where
lexical recall is small) and has no rewrites in the worker's version yet gets generated and
written to the rewrite store (``streams.rewrite_store``; live at once when the version is
the serving one). Each poll's generation stops at ``rewrite_deadline_s``: keys it did not reach
are left for the next time they are searched, and offsets are committed either way, so a slow
generator delays rewrites, never the stream, and search never waits for any of it. Events
that do not parse are skipped and counted (the stream worker dead-letters them). Given
``keep`` (the minimum-relevance rule, ``models.rewriting.intent.keep_on_intent`` over the
catalog), only the rewrites it keeps are written, as the offline fill writes them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tailbridge.models.rewriting.bounds import clean_query
from tailbridge.settings import Settings
from tailbridge.streams.events import EventValidationError, QueryEvent, decode
from tailbridge.streams.rewrite_store import RewriteWriter
from tailbridge.streams.topics import TOPICS, make_consumer
from tailbridge.vocab import normalize_query

POLL_MS = 500
REPORT_SECONDS = 10.0
# (queries, their generated rewrites) -> (the rewrites kept, how many were dropped)
Keep = Callable[[list[str], list[list[str]]], tuple[list[list[str]], int]]


class RewriteWorker:
    def __init__(self, settings: Settings, generator: Any, version: str, writer: RewriteWriter, redis_client: Any = None,
                 keep: Keep | None = None):
        self.settings, self.generator, self.version, self.writer = settings, generator, version, writer
        self._redis = redis_client if redis_client is not None else writer._redis
        self._seen = f"tb:{settings.feast_project}:rewriter:seen:"
        self.keep = keep
        self.counts = {"queries": 0, "unparsable": 0, "rare": 0, "generated": 0, "deferred": 0, "no_rewrite": 0,
                       "dropped_by_intent": 0}

    @staticmethod
    def group_id(settings: Settings) -> str:
        return f"{settings.topic_prefix}.rewriter"

    def select(self, raw_values: Sequence[bytes]) -> list[str]:
        """Keys of the batch's queries that are rare and have no rewrites in the version yet."""
        keys: list[str] = []
        for raw in raw_values:
            try:
                event = decode(raw, (QueryEvent,))
            except EventValidationError:
                self.counts["unparsable"] += 1
                continue
            self.counts["queries"] += 1
            key = normalize_query(event.query)  # what search looks rewrites up by
            if clean_query(key):  # something printable to rewrite (the generator cleans it again)
                keys.append(key)
        if not keys:
            return []
        with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.incr(self._seen + key)
                pipe.expire(self._seen + key, self.settings.rewrite_seen_ttl_s)
            seen = pipe.execute()[::2]
        latest = dict(zip(keys, seen))  # a key's last count in the batch: all its searches so far
        rare = [k for k, n in latest.items() if n <= self.settings.rewrite_rare_max_seen]
        self.counts["rare"] += len(rare)
        return [k for k, done in zip(rare, self.writer.has(self.version, rare)) if not done]

    def generate(self, keys: Sequence[str], deadline: float) -> dict[str, list[str]]:
        """Rewrites for as many keys as fit before ``deadline`` (monotonic), a few at a time."""
        out: dict[str, list[str]] = {}
        chunk = max(1, self.settings.rewrite_worker_chunk)
        for start in range(0, len(keys), chunk):
            if time.monotonic() >= deadline:
                self.counts["deferred"] += len(keys) - start
                break
            part = list(keys[start:start + chunk])
            rewrites = self.generator.rewrite(part, n=self.settings.rewrite_count, beams=self.settings.rewrite_worker_beams)
            if self.keep is not None:
                rewrites, dropped = self.keep(part, rewrites)
                self.counts["dropped_by_intent"] += dropped
            for key, texts in zip(part, rewrites):
                if texts:
                    out[key] = texts
                else:
                    self.counts["no_rewrite"] += 1
        return out

    def handle(self, raw_values: Sequence[bytes]) -> int:
        """One poll's records: select, generate within the deadline, write. Returns rewrites written."""
        keys = self.select(raw_values)
        if not keys:
            return 0
        rewrites = self.generate(keys, time.monotonic() + self.settings.rewrite_deadline_s)
        self.writer.put_many(self.version, rewrites)
        self.counts["generated"] += len(rewrites)
        return len(rewrites)

    def run(self, stop: threading.Event | None = None, report: Callable[[str], None] | None = None) -> None:
        stop = stop or threading.Event()
        consumer = make_consumer(self.settings, TOPICS["queries"].topic(self.settings), group_id=self.group_id(self.settings))
        last_report = time.monotonic()
        try:
            while not stop.is_set():
                batches = consumer.poll(timeout_ms=POLL_MS, max_records=self.settings.rewrite_worker_chunk * 8)
                values = [m.value for records in batches.values() for m in records]
                if values:
                    self.handle(values)
                    consumer.commit()
                if report is not None and time.monotonic() - last_report > REPORT_SECONDS:
                    report(f"rewrite worker: {self.counts}")
                    last_report = time.monotonic()
        finally:
            consumer.close()
