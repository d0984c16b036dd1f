"""What the worker (``streams.app``) does when work fails.

Two kinds of failure are told apart. A transient one is a dependency down or slow (a refused
or dropped connection, a timeout, Milvus unavailable): the work is held and retried with
backoff for as long as it lasts, so a slow dependency slows the worker instead of losing
events. Anything else is taken as a property of the events themselves (a store rejected
their content, a processor raised on them): retrying the same batch would fail forever, so
``apply_isolating`` applies the batch again in halves, down to single events, until the good
events are applied and only the event that fails on its own is left; after ``attempts`` tries
it is given up (the worker dead-letters it) and the stream moves on.

Every wait here is an ``asyncio`` sleep and every blocking call runs on a daemon thread
(``on_thread``): stopping the worker cancels a retry at once, and a call stuck in a dead
dependency never keeps the process from exiting.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
import redis
from pymilvus.exceptions import ErrorCode, MilvusException, MilvusUnavailableException

log = logging.getLogger("tailbridge.worker")
T = TypeVar("T")
R = TypeVar("R")

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
POISON_RETRY_S = 0.2  # pause before trying a lone failing event again (times the tries so far)


class Unavailable(RuntimeError):
    """Raised by a processor for a failure that is not its events' fault (a model that cannot be
    loaded, a misconfigured store): held and retried like a dependency that is down, never
    dead-lettered, since every event would fail the same way."""


# Builtin OSError covers ConnectionError, TimeoutError (asyncio's too) and the file system.
TRANSIENT: tuple[type[BaseException], ...] = (Unavailable, OSError, redis.ConnectionError, redis.TimeoutError,
                                             MilvusUnavailableException, grpc.FutureTimeoutError)
TRANSIENT_GRPC = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}


def is_transient(exc: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says a dependency is down or slow.
    ``extra``: more exception types that mean so (a processor's ``transient``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TRANSIENT + extra) or getattr(current, "retriable", False) is True:  # Kafka clients
            return True
        if isinstance(current, grpc.RpcError) and callable(getattr(current, "code", None)) \
                and current.code() in TRANSIENT_GRPC:
            return True
        if isinstance(current, MilvusException) and (current.code in TRANSIENT_GRPC or current.code == ErrorCode.RATE_LIMIT):
            return True  # pymilvus raises a gRPC failure it gave up retrying as MilvusException(status code)
        current = current.__cause__
    return False


def describe(exc: BaseException, limit: int = 1000) -> str:
    return f"{type(exc).__name__}: {exc}"[:limit]


class Backoff:
    """Exponential delays for a transient failure: 0.5 s, 1 s, 2 s ... at most MAX_BACKOFF_S."""

    def __init__(self) -> None:
        self.delay = FIRST_BACKOFF_S

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, MAX_BACKOFF_S)
        return delay


async def on_thread(fn: Callable[..., R], *args) -> R:
    """``fn(*args)`` on a daemon thread. Unlike ``asyncio.to_thread`` (the loop's executor,
    whose threads the interpreter joins at exit) a call stuck in a dead dependency cannot hold
    up the exit; cancelling the await abandons the call."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            outcome = (fn(*args), None)
        except BaseException as exc:  # noqa: BLE001  handed to the awaiting task
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop closed meanwhile: nobody waits for this any more
            pass

    threading.Thread(target=run, name=getattr(fn, "__name__", "work"), daemon=True).start()
    return await future


class Status:
    """What one retried piece of work is failing with, for the worker's status record."""

    def __init__(self) -> None:
        self.retrying_since: float | None = None  # epoch seconds of the first failure in a row
        self.retrying = ""

    def failed(self, exc: BaseException) -> bool:
        """Note a failure; True if it is the first in a row."""
        first = self.retrying_since is None
        if first:
            self.retrying_since = time.time()
        self.retrying = describe(exc, 300)
        return first

    def recovered(self) -> None:
        self.retrying_since, self.retrying = None, ""


async def _pause(what: str, exc: BaseException, status: Status, backoff: Backoff) -> None:
    delay = backoff.next()
    if status.failed(exc):
        log.warning("%s failed; retrying in %.1f s, with backoff, until it succeeds", what, delay, exc_info=exc)
    else:
        log.warning("%s failed again (%s); retrying in %.1f s", what, describe(exc, 300), delay)
    await asyncio.sleep(delay)


async def retry(what: str, work: Callable[[], Awaitable[T]], status: Status) -> T:
    """Await ``work()`` until it succeeds: for work no event can be blamed for (a periodic job,
    a start-up step), whatever the failure."""
    backoff = Backoff()
    while True:
        try:
            result = await work()
        except Exception as exc:
            await _pause(what, exc, status, backoff)
            continue
        status.recovered()
        return result


async def apply_isolating(items: Sequence[T], apply: Callable[[list[T]], Awaitable[R]], *, what: str,
                          transient: Callable[[BaseException], bool], attempts: int,
                          applied: Callable[[list[T], R], None],
                          give_up: Callable[[T, BaseException], Awaitable[None]],
                          status: Status, still_ours: Callable[[], bool] = lambda: True) -> bool:
    """Apply ``items`` in order, in as few calls of ``apply`` as failures allow.

    A transient failure holds the group and retries it with backoff. Any other failure splits
    the group in halves, applied one after the other (so order is kept); a single item that
    still fails ``attempts`` times is handed to ``give_up``. ``applied(group, result)`` is
    called for each group applied. ``apply`` must tolerate being called again with items it
    applied in part before failing (the stream processors are idempotent). Returns False,
    leaving the rest unapplied, when ``still_ours()`` turns false while waiting (the
    partitions went to another worker, which will apply them).
    """
    pending: list[list[T]] = [list(items)] if items else []
    while pending:
        group = pending.pop(0)
        backoff, tries = Backoff(), 0
        while True:
            try:
                result = await apply(group)
            except Exception as exc:
                if transient(exc):
                    if not still_ours():
                        return False
                    await _pause(f"{what} ({len(group)} events)", exc, status, backoff)
                    continue
                status.recovered()
                tries += 1
                if len(group) > 1:
                    log.warning("%s: %d events failed (%s); applying them in halves to find the one that fails",
                                what, len(group), describe(exc, 300))
                    half = len(group) // 2
                    pending[:0] = [group[:half], group[half:]]
                    break
                if tries < attempts:
                    await asyncio.sleep(POISON_RETRY_S * tries)
                    continue
                await give_up(group[0], exc)
                break
            status.recovered()
            applied(group, result)
            break
    return True
