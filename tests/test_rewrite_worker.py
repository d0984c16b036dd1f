"""The rewrite store's versions and the stream's rewrite worker, against the session's real
Kafka-protocol broker and Redis. The generator here is a stand-in with the real output bounds
(the models are tested in test_rewriter.py): this checks what the worker decides and writes."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from tailbridge.feature_repo.online import resolve_online_store
from tailbridge.models.rewriting.bounds import MAX_REWRITE_CHARS, MAX_REWRITE_WORDS, clean_query, distinct_rewrites
from tailbridge.serving.context import RedisRewriteStore
from tailbridge.streams.events import QueryEvent
from tailbridge.streams.rewrite_store import RewriteWriter
from tailbridge.streams.rewrite_worker import RewriteWorker
from tailbridge.streams.topics import TOPICS, create_topics, make_producer
from tailbridge.vocab import normalize_query
from tests.rewriter_tiny import tiny_generator

pytestmark = pytest.mark.integration


class StandIn:
    """Rewrites every query to "<first word> kit" through the real bounds; optionally slow."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self.calls = seconds, 0

    def rewrite(self, queries, n=1, beams=1):
        self.calls += 1
        time.sleep(self.seconds)
        return [distinct_rewrites(q, [f"{clean_query(q).split(' ')[0]} kit" if clean_query(q) else ""], n) for q in queries]


@pytest.fixture(scope="module")
def env(stack_settings):
    run_id = uuid.uuid4().hex[:8]
    settings = stack_settings.model_copy(update={"topic_prefix": f"rw-{run_id}", "feast_project": f"rw_{run_id}",
                                                 "rewrite_rare_max_seen": 2, "rewrite_deadline_s": 0.5})
    create_topics(settings)
    url = resolve_online_store(settings).redis_url
    r = redis.Redis.from_url(url)
    yield settings, url, r
    for key in r.scan_iter(f"tb:{settings.feast_project}:*", count=1000):
        r.delete(key)


def test_versions_are_written_beside_the_live_lists_and_promoted(env):
    settings, url, r = env
    writer = RewriteWriter.from_url(url, settings.feast_project)
    assert writer.live_key("dog pulls on walks") == RedisRewriteStore(url, settings.feast_project).key("dog pulls on walks")
    writer.put_many("v1", {"dog pulls on walks": ["no-pull dog harness"], "cat on counter": ["cat deterrent mat"]})
    assert not r.exists(writer.live_key("dog pulls on walks"))  # v1 is not serving yet
    assert writer.promote("v1") == {"live": 2, "removed": 0} and writer.serving_version() == "v1"
    assert r.lrange(writer.live_key("dog pulls on walks"), 0, -1) == [b"no-pull dog harness"]
    writer.put_many("v1", {"couch for family": ["sofa", "sectional sofa"]})  # serving: live at once
    assert r.lrange(writer.live_key("couch for family"), 0, -1) == [b"sofa", b"sectional sofa"]
    writer.put_many("v2", {"dog pulls on walks": ["dog harness"]})
    assert writer.promote("v2") == {"live": 1, "removed": 2}
    assert r.lrange(writer.live_key("dog pulls on walks"), 0, -1) == [b"dog harness"]
    assert not r.exists(writer.live_key("cat on counter")) and writer.get("v1", "cat on counter") == ["cat deterrent mat"]
    assert writer.promote("v1")["live"] == 3  # roll back: v1 kept its lists
    assert writer.count("v2") == 1


def test_search_reads_each_live_list_with_the_version_it_came_from(env):
    """Search records the version whose rewrites it used: per live list, also while a promotion
    has copied some lists of the new version and not yet moved the serving pointer."""
    import asyncio

    settings, url, r = env
    project = settings.feast_project + "_lv"
    writer = RewriteWriter.from_url(url, project)

    def read(query_key: str):
        async def go():
            store = RedisRewriteStore(url, project)
            try:
                return await store.get(query_key)
            finally:
                await store.close()
        got = asyncio.run(go())
        return got.texts, got.version

    try:
        assert read("dog pulls on walks") == ([], None)  # nothing written: no rewrites, no version
        writer.put_many("v1", {"dog pulls on walks": ["no-pull dog harness"], "cat on counter": ["cat deterrent mat"]})
        writer.promote("v1")
        assert read("dog pulls on walks") == (["no-pull dog harness"], "v1")
        writer.put_many("v2", {"dog pulls on walks": ["dog harness"]})  # not serving: the live list stays v1's
        assert read("dog pulls on walks") == (["no-pull dog harness"], "v1")
        # Mid-promotion: v2's list copied over the live one, the pointer still on v1.
        with r.pipeline(transaction=True) as pipe:
            writer.set_live(pipe, "v2", "dog pulls on walks", ["dog harness"])
            pipe.execute()
        assert writer.serving_version() == "v1" and read("dog pulls on walks") == (["dog harness"], "v2")
        assert read("cat on counter") == (["cat deterrent mat"], "v1")
        writer.promote("v2")  # v2 has no list for the cat query: its live list and version go
        assert read("cat on counter") == ([], None) and writer.live_version("cat on counter") is None
        writer.promote("v1")  # roll back
        assert read("dog pulls on walks") == (["no-pull dog harness"], "v1") and writer.live_version("cat on counter") == "v1"
        # A live list written before lists recorded their version reads as the serving version's.
        r.hdel(f"tb:{project}:rewriter@live", "cat on counter")
        assert read("cat on counter") == (["cat deterrent mat"], "v1")
    finally:
        for key in r.scan_iter(f"tb:{project}:*", count=1000):
            r.delete(key)


def test_worker_writes_rewrites_for_new_rare_queries_only(env):
    settings, url, r = env
    writer = RewriteWriter.from_url(url, settings.feast_project)
    writer.promote("w1")
    topic = TOPICS["queries"].topic(settings)
    producer = make_producer(settings)

    def query(text: str) -> bytes:
        return QueryEvent(user_id="u1", session_id="s1", query_id=uuid.uuid4().hex, query=text).model_dump_json().encode()

    head = "sofa"
    values = [query(head) for _ in range(3)]  # seen 3 times > rewrite_rare_max_seen: head, no rewrite
    values += [query("something to keep the cat off the counter"), query("\x00\x1b\u200b"), query("x" * 500),
               query("狗绳 防止拉扯"), b"not json", b'{"type": "query"}']
    for value in values:
        producer.send(topic, value=value, key=b"u1")
    producer.flush()

    generator = StandIn()
    worker = RewriteWorker(settings, generator, "w1", writer)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while worker.counts["queries"] + worker.counts["unparsable"] < len(values) and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert worker.counts["unparsable"] == 2 and worker.counts["queries"] == len(values) - 2
    live = writer.live_key
    assert r.lrange(live("something to keep the cat off the counter"), 0, -1) == [b"something kit"]
    assert r.lrange(live("狗绳 防止拉扯"), 0, -1) == [b"\xe7\x8b\x97\xe7\xbb\xb3 kit"]
    [long] = r.lrange(live("x" * 500), 0, -1)  # keyed by the whole query, the rewrite bounded
    assert 0 < len(long) <= MAX_REWRITE_CHARS
    assert not r.exists(live(head)) and writer.count("w1") == 3
    # A query already rewritten in this version is not generated again.
    calls = generator.calls
    assert worker.handle([query("something to keep the cat off the counter")]) == 0 and generator.calls == calls


def test_generation_past_the_deadline_is_deferred_not_waited_for(env):
    settings, url, r = env
    writer = RewriteWriter.from_url(url, settings.feast_project)
    worker = RewriteWorker(settings.model_copy(update={"rewrite_worker_chunk": 1}), StandIn(seconds=0.4), "slow", writer)
    events = [QueryEvent(user_id="u", session_id="s", query_id=f"q{i}", query=f"rare thing {i}").model_dump_json().encode()
              for i in range(4)]
    started = time.monotonic()
    written = worker.handle(events)
    assert time.monotonic() - started < 1.5  # 0.5 s deadline + the chunk running when it passed
    assert written == 2 and worker.counts["deferred"] == 2


def test_worker_with_the_real_generator_survives_bad_queries(env):
    """Bad input through the real generating path (a tiny GPT-2, int8 as the worker runs it):
    nothing crashes the worker, and whatever it writes is a valid rewrite of the query's key."""
    import torch

    torch.set_num_threads(1)
    settings, url, r = env
    writer = RewriteWriter.from_url(url, settings.feast_project)
    generator = tiny_generator(["no-pull dog harness", "cat deterrent mat", "velvet sofa"]).quantized()
    assert generator.int8
    worker = RewriteWorker(settings.model_copy(update={"rewrite_deadline_s": 30.0}), generator, "bad-input", writer)
    texts = ["   ", "\x00\x01\x1b\x7f\u200b", "x" * 512, "dog " * 128, "狗绳 防止拉扯", "كلب مقود", "🐕🦮 leash",
             "dog\u202eleash\u200b", "DOG  LEASH\t\n", "\n\n\nsofa\n", "a"]
    values = [QueryEvent(user_id="u", session_id="s", query_id=f"bad{i}", query=t).model_dump_json().encode()
              for i, t in enumerate(texts)]
    # A lone surrogate (valid JSON, not encodable as UTF-8), invalid UTF-8 and a query over the contract's limit.
    values += [b'{"type": "query", "user_id": "u", "session_id": "s", "query_id": "sur", "query": "dog \\ud800 leash"}',
               b'{"type": "query", "user_id": "u", "session_id": "s", "query_id": "utf", "query": "dog \xff leash"}',
               QueryEvent.model_construct(user_id="u", session_id="s", query_id="long", query="y" * 5000)
               .model_dump_json().encode()]
    worker.handle(values)
    assert worker.counts["queries"] + worker.counts["unparsable"] == len(values)
    keys = [raw.decode()[len(writer.key("bad-input", "")):] for raw in r.scan_iter(writer.key("bad-input", "*"))]
    for key in keys:
        rewrites = writer.get("bad-input", key)
        assert rewrites, key  # an entry is written only with rewrites in it
        for rewrite in rewrites:
            assert rewrite.strip() and rewrite.isprintable() and normalize_query(rewrite) != key
            assert len(rewrite) <= MAX_REWRITE_CHARS and len(rewrite.split()) <= MAX_REWRITE_WORDS
    assert "" not in keys and normalize_query("\x00\x01\x1b\x7f\u200b") not in keys  # nothing printable: no rewrite
