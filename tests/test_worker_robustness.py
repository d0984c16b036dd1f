"""No event stalls or poisons `tailbridge worker` (real broker, Redis, Milvus; the worker
as a subprocess): events that can never be applied go to their topic's DLQ with the reason
and the partition moves on; a worker stuck on a dead dependency says so in its status record,
in `tailbridge worker status` and in the query handler's /readyz, and stops within seconds on
SIGTERM or SIGINT, leaving what it had not applied to be redelivered."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import time

import orjson
import pytest
from fastapi.testclient import TestClient
from kafka.partitioner.default import murmur2
from tailbridge.bench.common import CLI, cmdline, descendants
from tailbridge.models.retrieval.encoders import load_encoder
from tailbridge.serving.app import create_app as query_handler
from tailbridge.streams import heartbeat, item_index
from tailbridge.streams.behaviour import Keys
from tailbridge.streams.events import CatalogUpsert, InteractionEvent, encode
from tailbridge.streams.topics import TOPICS, make_consumer, make_producer

from tailbridge.synthetic.replay import publish
from tests.conftest import Worker, free_port, settings_env, stream_namespace, wait_until

pytestmark = pytest.mark.integration

LEGACY_TITLE_BYTES = 64  # the serving collection below was made when titles were this short


def partition_of(settings, key: str) -> int:
    """The partition the producer's default partitioner picks for ``key``."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % settings.topic_partitions


def keys_like(settings, key: str, prefix: str) -> tuple[str, str]:
    """A key on the same partition as ``key`` and one on another."""
    candidates = (f"{prefix}-{i}" for i in itertools.count())
    same = next(k for k in candidates if partition_of(settings, k) == partition_of(settings, key))
    other = next(k for k in candidates if partition_of(settings, k) != partition_of(settings, key))
    return same, other


def make_legacy_serving_collection(milvus, settings) -> None:
    """The serving collection as an older release made it: a `title` of LEGACY_TITLE_BYTES.
    The contract allows longer titles; this collection cannot hold them."""
    version = settings.encoder_version
    bm25 = item_index.server_has_bm25(milvus)
    schema = item_index._schema(load_encoder(version).dim, bm25)
    next(f for f in schema.fields if f.name == "title").params["max_length"] = LEGACY_TITLE_BYTES
    index = milvus.prepare_index_params()
    index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    if bm25:
        index.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    name = item_index.collection_name(settings, version)
    milvus.create_collection(name, schema=schema, index_params=index)
    milvus.alter_collection_properties(name, {item_index.VERSION_PROPERTY: version})
    item_index.point_alias(milvus, settings, version)


@pytest.fixture(scope="module")
def env(stack_settings, tmp_path_factory):
    with stream_namespace(stack_settings, tmp_path_factory.mktemp("robust"), "tbw", worker_batch_seconds=0.1,
                          worker_flush_seconds=0.5, worker_poison_attempts=2) as ns:
        make_legacy_serving_collection(ns.milvus, ns.settings)
        ns.worker.start()
        yield ns


@pytest.fixture(scope="module")
def stuck_env(stack_settings, tmp_path_factory):
    """A namespace of its own: a stuck worker must not share a consumer group with a healthy one."""
    with stream_namespace(stack_settings, tmp_path_factory.mktemp("stuck"), "tbx", worker_batch_seconds=0.1,
                          worker_stuck_seconds=3.0) as ns:
        yield ns


def upsert(item_id: str, title: str) -> CatalogUpsert:
    return CatalogUpsert(item_id=item_id, title=title, category_path=["Home", "Lamps"], brand="Lumen", price=59.0)


def click(user: str, item: str = "lamp-1") -> InteractionEvent:
    return InteractionEvent(action="click", user_id=user, session_id=f"{user}-s", item_id=item, position=1)


def dead_letters(settings, topic: str, count: int) -> list:
    consumer = make_consumer(settings, TOPICS[topic].dlq(settings), group_id=None, consumer_timeout_ms=15_000)
    try:
        return list(itertools.islice(consumer, count))
    finally:
        consumer.close()


def headers(record) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


def user_session(store, user: str) -> str | None:
    return store.get_online_features(features=["user_context:session_id"],
                                     entity_rows=[{"user_id": user}]).to_dict()["session_id"][0]


def test_poison_events_go_to_the_dlq_and_the_events_after_them_are_applied(env):
    settings, r, milvus, store = env.settings, env.redis, env.milvus, env.store
    catalog, interactions = TOPICS["catalog"].topic(settings), TOPICS["interactions"].topic(settings)

    # Catalog: an upsert the contract accepts (a 100-byte title) that the serving collection
    # cannot hold, then bytes that are not JSON and an upsert the contract refuses (a 200-byte
    # item id), all on one partition; then good upserts on that partition and on another.
    poison = upsert("lamp-poison", "Ünïcödé brass floor lamp with a linen shade, dimmable, 1.6 m tall")
    assert LEGACY_TITLE_BYTES < len(poison.title.encode()) <= 1024
    too_long_id = orjson.dumps(orjson.loads(encode(upsert("x", "Lamp"))) | {"item_id": "x" * 200})
    same, other = keys_like(settings, poison.item_id, "lamp")
    # Behaviour: the state an incompatible older worker left for one shopper makes the
    # behaviour processor raise on that shopper's events, and only on theirs.
    r.set(Keys(settings).user("u_corrupt"), b"\xff\x00 not the JSON of a user state")
    user_same, user_other = keys_like(settings, "u_corrupt", "u_good")

    publish(settings, [poison])
    producer = make_producer(settings)
    producer.send(catalog, key=poison.item_id.encode(), value=b"{not json")
    producer.send(catalog, key=poison.item_id.encode(), value=too_long_id)
    producer.flush()
    producer.close()
    publish(settings, [upsert(same, "Brass table lamp"), upsert(other, "Linen floor lamp"),
                       click("u_corrupt"), click(user_same), click(user_other)])

    alias = item_index.alias_name(settings)
    wait_until(lambda: len(milvus.query(alias, ids=[same, other], output_fields=["item_id"])) == 2, 120,
               "the good upserts after the poison to be indexed\n" + env.worker.log_tail())
    wait_until(lambda: user_session(store, user_same) and user_session(store, user_other), 60,
               "the good interactions after the poison to be applied\n" + env.worker.log_tail())
    assert milvus.query(alias, ids=[poison.item_id], output_fields=["item_id"]) == []

    dead = sorted(dead_letters(settings, "catalog", 3), key=lambda d: int(headers(d)["source_offset"]))
    assert [d.value for d in dead] == [encode(poison), b"{not json", too_long_id]  # the original bytes
    reasons = [headers(d)["error"] for d in dead]
    # Milvus Lite names the field ("VARCHAR field 'title' ... exceeds max_length=64"), the 2.3.5
    # server only the limit ("the length (69) of 0th string exceeds max length (64)").
    assert reasons[0].startswith("item_indexer could not apply it: MilvusException")
    assert re.search(rf"exceeds max[ _]length\W+{LEGACY_TITLE_BYTES}\b", reasons[0]), reasons[0]
    assert "not valid JSON" in reasons[1]
    assert "catalog_upsert.item_id" in reasons[2] and "at most 128" in reasons[2]
    for record in dead:
        assert headers(record)["source_topic"] == catalog
        assert int(headers(record)["source_partition"]) == partition_of(settings, poison.item_id)

    [dead_click] = dead_letters(settings, "interactions", 1)
    assert orjson.loads(dead_click.value)["user_id"] == "u_corrupt"
    assert headers(dead_click)["error"].startswith("behaviour could not apply it: JSONDecodeError")
    assert headers(dead_click)["source_topic"] == interactions
    assert int(headers(dead_click)["source_partition"]) == partition_of(settings, "u_corrupt") \
        == partition_of(settings, user_same)

    def counted():  # the status record is rewritten every HEARTBEAT_S
        [record] = heartbeat.read_workers(r, settings)
        dead = {name: record.processors[name]["dead_lettered"] for name in ("item_indexer", "behaviour")}
        return dead == {"item_indexer": 3, "behaviour": 1} and record

    record = wait_until(counted, 10, "the status record to count the dead-lettered events")
    assert heartbeat.problems(record, settings) == {}


def stop(worker: Worker, signum: int) -> float:
    started = time.monotonic()
    os.killpg(worker.pid, signum)
    try:
        worker.proc.wait(30)
    except subprocess.TimeoutExpired:
        worker.kill9()
    return time.monotonic() - started


def test_a_worker_stuck_on_a_dead_milvus_says_so_and_stops_on_sigterm(stuck_env, tmp_path):
    settings, r = stuck_env.settings, stuck_env.redis
    dead_milvus = settings.model_copy(update={"milvus_uri": f"http://127.0.0.1:{free_port()}"})
    worker = Worker(dead_milvus, tmp_path / "worker.log")
    worker.start()
    try:
        publish(settings, [upsert("lamp-stuck", "Walnut desk lamp"), click("u_fine")])

        def stuck_record():
            mine = [rec for rec in heartbeat.read_workers(r, settings) if rec.worker.endswith(f":{worker.pid}")]
            return mine and "item_indexer" in heartbeat.problems(mine[0], settings) and mine[0]

        record = wait_until(stuck_record, 180, "the worker's status record to show it stuck", worker=worker)
        indexer = record.processors["item_indexer"]
        assert indexer["held"] >= 1 and indexer["retrying_since"] and "Fail connecting" in indexer["retrying"]
        assert wait_until(lambda: user_session(stuck_env.store, "u_fine"), 60, "behaviour to go on without Milvus")

        with TestClient(query_handler(settings)) as client:
            readiness = client.get("/readyz").json()
        assert readiness["dependencies"]["stream_worker"].startswith("stuck: ")
        assert f":{worker.pid} item_indexer stuck: no progress" in readiness["dependencies"]["stream_worker"]

        status = subprocess.run([CLI, "worker", "status"], check=False, env=settings_env(settings), capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert status.returncode == 1 and "item_indexer stuck: no progress for" in status.stdout, status.stdout
    finally:
        elapsed = stop(worker, signal.SIGTERM)
    assert elapsed < 5, f"SIGTERM took {elapsed:.1f} s\n{worker.log_tail()}"
    assert worker.proc.returncode == 0 and "Traceback" not in worker.log_tail(800)
    assert not [rec for rec in heartbeat.read_workers(r, settings) if rec.worker.endswith(f":{worker.pid}")]


def test_sigint_stops_a_worker_retrying_on_a_dead_redis_and_the_rest_is_redelivered(stuck_env, tmp_path):
    settings = stuck_env.settings
    dead_redis = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    worker = Worker(dead_redis, tmp_path / "worker.log")
    worker.start()
    try:
        publish(settings, [click("u_later")])
        wait_until(lambda: "behaviour batch (1 events) failed" in worker.log_tail(20_000), 180,
                   "the worker to retry its batch", worker=worker)
    finally:
        elapsed = stop(worker, signal.SIGINT)
    assert elapsed < 5, f"SIGINT took {elapsed:.1f} s\n{worker.log_tail()}"
    assert user_session(stuck_env.store, "u_later") is None

    stuck_env.worker.start()  # the same group, with a Redis that answers: the click was not committed
    wait_until(lambda: user_session(stuck_env.store, "u_later"), 180, "the click to be redelivered and applied",
               worker=stuck_env.worker)


def test_ctrl_c_ends_the_demo_cleanly_and_stops_its_worker(stack_settings, tmp_path):
    """Ctrl-C in a terminal: SIGINT to the demo's process group (its worker runs in a session of
    its own, as `demo` starts it) while the live replay runs."""
    log = tmp_path / "demo.log"
    with stream_namespace(stack_settings, tmp_path, "tbd") as ns, log.open("wb") as out:
        demo = subprocess.Popen([CLI, "demo", "--items", "40", "--users", "4", "--events", "100000", "--rate", "50",
                                 "--no-serve"], env=settings_env(ns.settings), cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        worker = None
        try:
            def demo_worker() -> int | None:
                assert demo.poll() is None, log.read_text(errors="replace")
                workers = [pid for pid in descendants(demo.pid)[1:] if "worker" in " ".join(cmdline(pid))]
                return workers[0] if workers else None

            worker = wait_until(demo_worker, 240, "the demo to start its worker")
            wait_until(lambda: heartbeat.read_workers(ns.redis, ns.settings), 180, "the demo's worker to run")
            started = time.monotonic()
            os.killpg(demo.pid, signal.SIGINT)
            demo.wait(60)
            elapsed = time.monotonic() - started
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
            worker_left = worker is not None and os.path.exists(f"/proc/{worker}") and not _zombie(worker)
            if worker_left:  # in a session of its own: the demo's group kill does not reach it
                os.kill(worker, signal.SIGKILL)
        text = log.read_text(errors="replace")
        assert not worker_left, "the demo's worker is still running"
        assert demo.returncode == 130 and "demo interrupted" in text, text[-3000:]
        assert "Traceback" not in text and "Aborted" not in text, text[-3000:]
        assert elapsed < 20, f"the demo took {elapsed:.0f} s to stop"


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
