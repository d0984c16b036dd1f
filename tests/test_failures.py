"""The worker's failure handling as pure logic (``streams.failures``) and the judgement of its
status records (``streams.heartbeat.problems``). The worker doing it against the real stack is
tests/test_worker_robustness.py."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import redis
from pymilvus.exceptions import MilvusException

from tailbridge.settings import Settings
from tailbridge.streams import failures, heartbeat
from tailbridge.streams.failures import Status, Unavailable, apply_isolating, is_transient, on_thread


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(failures, "FIRST_BACKOFF_S", 0.01)
    monkeypatch.setattr(failures, "POISON_RETRY_S", 0.0)


class Unreachable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE


def milvus_down() -> MilvusException:
    """What pymilvus raises once it gives up retrying a call to a Milvus that does not answer."""
    try:
        raise MilvusException(code=2, message="Fail connecting to server") from Unreachable()
    except MilvusException as exc:
        return exc


@pytest.mark.parametrize("exc, transient", [
    (redis.ConnectionError("refused"), True), (redis.TimeoutError(), True), (ConnectionRefusedError(), True),
    (TimeoutError(), True), (OSError(28, "No space left on device"), True), (milvus_down(), True),
    (MilvusException(code=grpc.StatusCode.UNAVAILABLE, message="retry timeout"), True),
    (Unavailable("encoder missing"), True),
    (MilvusException(code=1100, message="length of varchar field text exceeds max length"), False),
    (ValueError("bad"), False), (KeyError("x"), False), (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), False),
    (redis.ResponseError("WRONGTYPE"), False),
])
def test_transient_failures_are_told_from_the_events_own(exc, transient):
    assert is_transient(exc) is transient


def test_a_processor_declares_more_transient_failures():
    class ModelBusy(Exception):
        pass

    assert not is_transient(ModelBusy()) and is_transient(ModelBusy(), extra=(ModelBusy,))


def run(items, apply, attempts=3, still_ours=lambda: True):
    applied, dead, calls = [], [], []

    async def call(group):
        calls.append(list(group))
        return apply(group)

    async def give_up(item, exc):
        dead.append((item, str(exc)))

    done = asyncio.run(apply_isolating(items, call, what="test", transient=is_transient, attempts=attempts,
                                       applied=lambda group, result: applied.extend(group), give_up=give_up,
                                       status=Status(), still_ours=still_ours))
    return done, applied, dead, calls


def test_a_failing_batch_is_split_until_only_the_poison_is_left():
    def apply(group):
        bad = [i for i in group if i in (4, 7)]
        if bad:
            raise ValueError(f"cannot apply {bad[0]}")

    done, applied, dead, calls = run(list(range(10)), apply, attempts=3)
    assert done
    assert applied == [0, 1, 2, 3, 5, 6, 8, 9]  # every good event, in order
    assert dead == [(4, "cannot apply 4"), (7, "cannot apply 7")]
    assert calls.count([4]) == 3 and calls.count([7]) == 3  # `attempts` tries alone, then given up
    assert len(calls) < 25  # halves, not one call per event for the good ones


def test_a_transient_failure_holds_the_whole_batch_until_it_passes():
    failures_left = [3]

    def apply(group):
        if failures_left[0]:
            failures_left[0] -= 1
            raise redis.ConnectionError("Redis is restarting")

    done, applied, dead, calls = run(list(range(5)), apply)
    assert done and applied == list(range(5)) and dead == []
    assert calls == [list(range(5))] * 4  # never split, never dead-lettered


def test_a_transient_failure_in_isolation_holds_that_group():
    state = {"redis_down": False}

    def apply(group):
        if state["redis_down"]:
            state["redis_down"] = False
            raise redis.ConnectionError("gone")
        if 2 in group:
            state["redis_down"] = len(group) > 1  # the dependency fails during the search for the poison
            raise ValueError("poison")

    done, applied, dead, _ = run([0, 1, 2, 3], apply, attempts=2)
    assert applied == [0, 1, 3] and [item for item, _ in dead] == [2]


def test_a_retry_is_cancelled_at_once_and_applies_nothing_more():
    applied = []

    async def main():
        async def down(group):
            raise redis.ConnectionError("down")

        async def give_up(item, exc):
            raise AssertionError("a transient failure is never dead-lettered")

        task = asyncio.create_task(apply_isolating([1, 2], down, what="test", transient=is_transient, attempts=1,
                                                   applied=lambda g, r: applied.extend(g), give_up=give_up,
                                                   status=Status()))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    assert asyncio.run(main()) < 0.1 and applied == []


def test_a_batch_whose_partitions_went_elsewhere_is_left_to_them():
    def apply(group):
        raise redis.ConnectionError("down")

    done, applied, dead, calls = run([1, 2], apply, still_ours=lambda: False)
    assert done is False and applied == [] and dead == [] and len(calls) == 1


def test_a_call_stuck_on_a_thread_does_not_hold_the_caller():
    release = threading.Event()

    async def main():
        task = asyncio.create_task(on_thread(release.wait))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    stuck = [t for t in threading.enumerate() if t.name == "wait"]
    assert stuck and all(t.daemon for t in stuck)  # the interpreter will not wait for it at exit
    release.set()
    assert asyncio.run(on_thread(lambda: 41 + 1)) == 42


def record(**processors) -> heartbeat.WorkerRecord:
    now = time.time()
    return heartbeat.WorkerRecord("host:1", now - 600, now, {
        name: heartbeat.Progress().as_json() | fields for name, fields in processors.items()})


def test_a_worker_stuck_or_lagging_is_reported_and_an_idle_one_is_not():
    settings = Settings(worker_stuck_seconds=30, worker_max_event_age_seconds=120)
    now = time.time()
    healthy = record(behaviour={"waiting": 3, "last_progress": now - 1},
                     item_indexer={"waiting": 0, "last_progress": now - 3600})  # idle for an hour: fine
    assert heartbeat.problems(healthy, settings) == {}
    assert heartbeat.summary([healthy], settings).startswith("ok (1 worker, 3 events waiting)")

    stuck = record(item_indexer={"held": 256, "waiting": 300, "last_progress": now - 45, "retrying_since": now - 44,
                                 "retrying": "MilvusException: unavailable", "oldest_unapplied": now - 50})
    [issue] = heartbeat.problems(stuck, settings).values()
    assert issue.startswith("stuck: no progress for 45 s while 300 events wait") and "MilvusException" in issue
    assert heartbeat.summary([healthy, stuck], settings).startswith("stuck: host:1 item_indexer stuck: no progress")

    lagging = record(behaviour={"held": 500, "waiting": 90_000, "last_progress": now, "oldest_unapplied": now - 400})
    assert heartbeat.problems(lagging, settings)["behaviour"].startswith("lagging: its oldest unapplied event is 400 s")

    failing_job = record(**{"behaviour.feedback_flush": {"retrying_since": now - 90, "retrying": "OSError: disk full"}})
    assert heartbeat.problems(failing_job, settings) == {
        "behaviour.feedback_flush": "stuck: failing for 90 s: OSError: disk full"}
    assert heartbeat.summary([], settings).startswith("none running")
