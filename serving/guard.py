"""Deadlines for optional dependencies (user context, rewrites).

A blocking client call runs on a small thread pool and search waits for it at most
``timeout_s``. Some clients cannot be interrupted (Feast's Redis read blocks 5-7 s when Redis
is down, whatever socket timeouts it is given), so after a failure the dependency is skipped
for ``cooldown_s`` and calls still stuck in the pool count against ``max_inflight``: a dead
dependency costs one deadline, then nothing, instead of piling up threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    value: T | None
    error: str | None  # None: the call answered in time

    @property
    def ok(self) -> bool:
        return self.error is None


class Guarded:
    def __init__(self, name: str, timeout_s: float, cooldown_s: float, max_inflight: int = 4):
        self.name = name
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self.max_inflight = max_inflight
        self._pool = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix=f"guard-{name}")
        self._lock = threading.Lock()
        self._inflight = 0
        self._skip_until = 0.0
        self.last_error: str | None = None

    def call(self, fn: Callable[[], T]) -> Outcome[T]:
        with self._lock:
            if time.monotonic() < self._skip_until:
                return Outcome(None, f"skipped after a recent failure: {self.last_error}")
            if self._inflight >= self.max_inflight:
                return Outcome(None, f"{self._inflight} earlier calls still hanging")
            self._inflight += 1
        future = self._pool.submit(fn)
        future.add_done_callback(self._done)
        try:
            return Outcome(future.result(timeout=self.timeout_s), None)
        except FutureTimeout:
            return self._failed(f"no answer within {self.timeout_s * 1000:.0f} ms")
        except Exception as exc:  # any client error means "answer without this dependency"
            return self._failed(f"{type(exc).__name__}: {exc}")

    def _done(self, _future) -> None:
        with self._lock:
            self._inflight -= 1

    def _failed(self, reason: str) -> Outcome:
        with self._lock:
            self.last_error = reason
            self._skip_until = time.monotonic() + self.cooldown_s
        return Outcome(None, reason)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
