"""The worker's processors: one interface (``streams.processor``), one registry
(``streams.registry``), and the faust app made from them (``streams.app.install``). The worker
running them end to end is tests/test_streams.py."""

from __future__ import annotations

from collections import Counter

import pytest

from tailbridge.streams import item_index
from tailbridge.streams.app import faust_app, install
from tailbridge.streams.processor import Periodic, Processor, Resources
from tailbridge.streams.registry import PROCESSORS
from tailbridge.streams.topics import TOPICS
from tests.conftest import stream_namespace

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def resources(stack_settings, tmp_path_factory):
    with stream_namespace(stack_settings, tmp_path_factory.mktemp("registry"), "tbreg",
                          worker_flush_seconds=0.7, worker_index_seal_seconds=3.0) as ns:
        yield Resources(ns.settings, ns.redis, ns.store, ns.milvus)


def test_the_registry_runs_todays_processors(resources):
    processors = {p.name: p for p in (factory(resources) for factory in PROCESSORS)}
    assert set(processors) == {"behaviour", "item_indexer", "index_seal", "rewrite_stats"}
    assert processors["behaviour"].topics == ("queries", "interactions")
    assert processors["behaviour"].fetch == "batch"  # its own batch consumer, not a faust agent
    assert processors["item_indexer"].fetch == "stream"
    assert processors["item_indexer"].topics == ("catalog",) and processors["item_indexer"].batch_size == 256
    assert processors["item_indexer"].start is not None  # loads the encoders at start
    assert {(j.name, j.every_s) for j in processors["behaviour"].periodic} == {
        ("item_stats_flush", 0.7), ("feedback_flush", 0.7), ("category_resolve", 0.7)}
    assert processors["behaviour"].clock is not None  # the worker advances its event-time clock
    assert [(j.name, j.every_s) for j in processors["index_seal"].periodic] == [("seal", 3.0)]
    assert all(t in TOPICS for p in processors.values() for t in p.topics)


def test_a_new_processor_gets_its_agent_timers_and_start_task(resources):
    seen = []
    toy = Processor("toy", ("rewrite_feedback",), apply=lambda events: {"toys": len(events)},
                    periodic=(Periodic("tick", 2.5, lambda: {}),), start=lambda: seen.append("started"))
    settings = resources.settings
    app = faust_app(settings, name="registry-test")
    registry = [factory(resources) for factory in PROCESSORS]
    tracked = install(app, [*registry, toy], settings, Counter())
    assert set(app.agents) == {"item_indexer", "toy", "rewrite_stats"}  # index_seal reads no topic; behaviour reads in batches
    assert app.agents["toy"].channel.topics == (TOPICS["rewrite_feedback"].topic(settings),)
    assert tracked["behaviour"].topics == {TOPICS["queries"].topic(settings), TOPICS["interactions"].topic(settings)}
    periodic = sum(len(p.periodic) for p in [*registry, toy])
    starts = sum(p.start is not None for p in [*registry, toy])
    batched = sum(p.fetch == "batch" for p in [*registry, toy])
    # One timer per periodic job, one task per start, one task per batch consumer.
    assert len(app._app_tasks) == periodic + starts + batched == periodic + starts + 1
    with pytest.raises(ValueError, match="unique"):
        install(faust_app(settings, name="registry-dup"), [toy, toy], settings, Counter())
    with pytest.raises(ValueError, match="topics and apply"):
        Processor("half", ("catalog",))


def test_the_index_seal_flushes_only_after_a_milvus_write(resources):
    from tailbridge.streams.index_seal import processor

    settings, milvus = resources.settings, resources.milvus
    item_index.create_collection(milvus, settings, settings.encoder_version, 8)
    [seal] = processor(resources).periodic
    resources.milvus_written.clear()
    assert seal.run() == {}  # nothing written: no flush
    resources.milvus_written.set()
    assert seal.run() == {"index_seals": 1}
    assert not resources.milvus_written.is_set()
    assert seal.run() == {}


def test_the_app_takes_the_latency_knobs_from_the_settings(resources):
    import asyncio

    settings = resources.settings.model_copy(update={"worker_fetch_wait_ms": 77, "worker_commit_seconds": 2.5})
    app = faust_app(settings, name="knobs-test")
    assert app.conf.broker_commit_interval == 2.5

    async def fetch_wait() -> int:  # the consumer faust would start (made in a loop, never started here)
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        try:
            return consumer._fetch_max_wait_ms
        finally:
            await consumer.stop()

    assert asyncio.run(fetch_wait()) == 77  # faust's own would be 1,500
