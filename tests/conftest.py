"""Shared fixtures: one real stack per test session.

With a Docker engine, Kafka (KRaft), Redis and Milvus run in testcontainers; without one
(this project's own machines and CI) the embedded stack is started by `tailbridge.infra.stack.up`, in
a temporary state dir and on free ports so it never touches a developer's running stack. Its
Milvus is the settings' engine: the 2.3.5 server by default, Milvus Lite with
TAILBRIDGE_MILVUS_ENGINE=lite; the fixtures below start the other engine beside it where a test
needs both.
Either way the tests get a ``Settings`` pointing at real servers; what the fixture started,
it stops.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

# The worker subprocess handle, the environment that carries Settings to a child process,
# waiting until a predicate holds and free ports are the benchmarks' helpers too: one
# implementation for both. Test modules import settings_env and wait_until from here.
from tailbridge.bench.common import Worker, free_port, settings_env, wait_until  # noqa: F401
from tailbridge.infra import stack
from tailbridge.settings import Settings


def docker_engine_available() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        client.close()
        return True
    except Exception:  # no client package, no socket, no daemon: all mean "no engine"
        return False


BACKEND = "testcontainers" if os.environ.get("TAILBRIDGE_TEST_BACKEND", "auto") != "embedded" and docker_engine_available() else "embedded"


def pytest_report_header(config) -> str:
    return f"tailbridge test stack: {BACKEND} (Kafka, Redis, Milvus are real servers)"


@dataclass
class Namespace:
    settings: Settings
    store: object  # feast.FeatureStore
    redis: object  # redis.Redis of the online store
    worker: Worker
    milvus: object  # pymilvus.MilvusClient


@contextmanager
def stream_namespace(stack_settings: Settings, root: Path, name: str, **overrides) -> Iterator[Namespace]:
    """A test module's own topics, Feast project and data dir on the session's stack, with a
    `tailbridge worker` for them (not started: the caller chooses when); removes all it made."""
    import redis

    from tailbridge.feature_repo.store import apply, feature_store
    from tailbridge.streams import item_index
    from tailbridge.streams.topics import create_topics

    run_id = uuid.uuid4().hex[:8]
    settings = stack_settings.model_copy(update={
        "topic_prefix": f"{name}-{run_id}", "feast_project": f"{name}_{run_id}", "data_dir": root / "data",
        **overrides})
    create_topics(settings)
    store = feature_store(settings)
    apply(store)
    r = redis.Redis.from_url(stack.resolve_online_store(settings).redis_url)
    milvus = item_index.connect(settings)
    worker = Worker(settings, root / "worker.log")
    try:
        yield Namespace(settings, store, r, worker, milvus)
    finally:
        worker.stop()
        store.teardown()
        for key in r.scan_iter(f"tb:{settings.feast_project}:*", count=1000):
            r.delete(key)
        for collection in item_index.live_collections(milvus, settings):
            milvus.drop_collection(collection)


def tiny_demo(root: Path, sessions: int) -> Path:
    """A 150-item demo data set with a feedback log of ``sessions`` simulated sessions, for
    training models in seconds."""
    from tailbridge.synthetic import catalog as synth
    from tailbridge.models.data.feedback import write_feedback
    from tailbridge.synthetic.feedback import simulate_feedback

    synth.write(synth.generate(items=150, users=6, seed=5), root)
    write_feedback(simulate_feedback(root, sessions=sessions, seed=5), root / "feedback")
    return root


def _container_settings(run: ExitStack, base: dict) -> Settings:
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.milvus import MilvusContainer
    from testcontainers.community.redis import RedisContainer

    kafka = run.enter_context(KafkaContainer().with_kraft())
    redis = run.enter_context(RedisContainer())
    milvus = run.enter_context(MilvusContainer())
    return Settings(
        **base,
        kafka_bootstrap=kafka.get_bootstrap_server(),
        redis_url=f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0",
        milvus_uri=milvus.get_connection_url(),
    )


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory) -> Iterator[Settings]:
    run_id = uuid.uuid4().hex[:8]
    root = tmp_path_factory.mktemp("stack")
    base = dict(
        state_dir=root / "state",
        data_dir=root / "data",
        feast_project=f"tbtest_{run_id}",  # isolates our keys in a shared Redis
        topic_prefix=f"tbtest-{run_id}",
    )
    with ExitStack() as run:
        if BACKEND == "testcontainers":
            settings = _container_settings(run, base)
        else:
            settings = Settings(
                **base,
                kafka_bootstrap=f"127.0.0.1:{free_port()}",
                milvus_uri=f"http://127.0.0.1:{free_port()}",
            )
            run.callback(stack.down, settings)
        stack.up(settings)
        yield settings


def _engine_stack(stack_settings: Settings, root: Path, engine: str) -> Iterator[Settings]:
    """The session's stack, or, when its Milvus is another engine, the same Kafka and Redis
    (used as external servers) with a Milvus of ``engine`` in a state dir of its own."""
    if stack_settings.milvus_engine == engine:
        yield stack_settings
        return
    settings = stack_settings.model_copy(update={
        "state_dir": root / "state", "milvus_engine": engine, "milvus_uri": f"http://127.0.0.1:{free_port()}",
        "redis_url": stack.resolve_online_store(stack_settings).redis_url or stack_settings.redis_url})
    try:
        stack.up(settings)
        yield settings
    finally:
        stack.down(settings)


@pytest.fixture(scope="session")
def bm25_milvus_settings(stack_settings, tmp_path_factory) -> Iterator[Settings]:
    """A BM25-capable Milvus: Milvus Lite 3.2.2 (server-side BM25 and hybrid search), or the
    containers' Milvus 2.5+."""
    if BACKEND == "testcontainers":
        yield stack_settings
        return
    yield from _engine_stack(stack_settings, tmp_path_factory.mktemp("bm25-milvus"), "lite")


@pytest.fixture(scope="session")
def milvus_server_settings(stack_settings, tmp_path_factory) -> Iterator[Settings]:
    """The embedded Milvus 2.3.5 server (no BM25: the term index beside it), confined to its
    own network namespace."""
    if BACKEND == "testcontainers":
        pytest.skip("testcontainers backend (a Docker engine answered): its Milvus is a container, not the "
                    "embedded 2.3.5 server this fixture starts; run without Docker to test that engine")
    yield from _engine_stack(stack_settings, tmp_path_factory.mktemp("milvus-server"), "milvus")
