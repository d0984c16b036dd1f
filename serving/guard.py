"""Deadlines and a circuit breaker for the optional dependencies of a search (user context,
rewrites, item stats).

Each call is a coroutine awaited at most ``timeout_s`` (``asyncio.wait_for`` cancels it, so a
slow dependency never holds a thread or the event loop). A dependency that *fails* (refuses
the connection, answers an error) is skipped for ``cooldown_s``: every search then answers at
once without it instead of paying the deadline. A *timeout* never trips it: a cancelled read
costs nothing but its own deadline, and on a busy machine a burst of concurrent reads can all
miss it together, which says nothing about the next ones; skipping the user context for
``cooldown_s`` at 50 searches/s would cost a hundred searches their personalisation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
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
    def __init__(self, name: str, timeout_s: float, cooldown_s: float):
        self.name = name
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self._skip_until = 0.0
        self.last_error: str | None = None

    async def call(self, fn: Callable[[], Awaitable[T]]) -> Outcome[T]:
        if time.monotonic() < self._skip_until:
            return Outcome(None, f"skipped after a recent failure: {self.last_error}")
        try:
            value = await asyncio.wait_for(fn(), self.timeout_s)
        except TimeoutError:
            self.last_error = f"no answer within {self.timeout_s * 1000:.0f} ms"
            return Outcome(None, self.last_error)
        except Exception as exc:  # any client error means "answer without this dependency"
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._skip_until = time.monotonic() + self.cooldown_s
            return Outcome(None, self.last_error)
        return Outcome(value, None)
