"""The ranker the model registry says serves, swapped in while the handler runs.

With ``TAILBRIDGE_RANKER_VERSION=auto`` the handler serves the registry's serving ranker
(``models.registry``). A promotion or rollback replaces the registry file; this wrapper
notices the new file (``Registry.stamp``, checked at most every ``check_every_s``), loads the new
version on a background thread and swaps one reference. Searches keep scoring with the
version they started with, so a swap never fails one; a version that fails to load is logged
and the old one keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tailbridge.models.registry import Registry

log = logging.getLogger(__name__)


class ReloadingRanker:
    def __init__(self, registry: Registry, load: Callable[[Path], Any], initial: Any, check_every_s: float = 2.0):
        self._registry, self._load, self._current = registry, load, initial
        self._check_every_s = check_every_s
        self._stamp = registry.stamp()
        self._checked = time.monotonic()
        self._loading = threading.Lock()

    @property
    def version(self) -> str:
        return self._current.version

    @property
    def current(self) -> Any:
        return self._current

    def score(self, *args, **kwargs):
        self.maybe_reload()
        ranker = self._current  # one read: the whole call uses one version
        return ranker.score(*args, **kwargs)

    def maybe_reload(self, wait: bool = False) -> None:
        """Start a reload when the registry changed; ``wait`` joins it (tests, the CLI)."""
        now = time.monotonic()
        if not wait and now - self._checked < self._check_every_s:
            return
        self._checked = now
        stamp = self._registry.stamp()
        if stamp == self._stamp or not self._loading.acquire(blocking=False):
            return
        thread = threading.Thread(target=self._reload, args=(stamp,), name="ranker-reload", daemon=True)
        thread.start()
        if wait:
            thread.join()

    def _reload(self, stamp: tuple[int, int] | None) -> None:
        try:
            serving = self._registry.read().serving("ranker")
            if serving is not None and serving.version != self._current.version:
                started = time.monotonic()
                self._current = self._load(Path(serving.path))
                log.info("ranker %s now serving (loaded in %.1f s)", serving.version, time.monotonic() - started)
            self._stamp = stamp
        except Exception:  # keep serving the loaded version; try again on the next change
            log.exception("could not load the registry's serving ranker; %s keeps serving", self._current.version)
            self._stamp = stamp
        finally:
            self._loading.release()
