"""Which online store Feast uses: a Redis URL, or SQLite under the state dir. Light (no
Feast import) so that every process, the local launcher included, resolves it the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson

from tailbridge.settings import Settings


@dataclass(frozen=True)
class OnlineStore:
    kind: Literal["redis", "sqlite"]
    redis_url: str | None = None


def stack_state_file(settings: Settings) -> Path:
    """Where the local launcher (`tailbridge stack up`) records what it started and chose."""
    return settings.state_dir / "stack.json"


def sqlite_path(settings: Settings) -> Path:
    return settings.state_dir / "feast" / "online.db"


def resolve_online_store(settings: Settings) -> OnlineStore:
    """The online store every process should use: what `stack up` chose for these settings,
    else what the settings say (an external deployment never runs `stack up`)."""
    path = stack_state_file(settings)
    recorded = orjson.loads(path.read_bytes()).get("redis", {}) if path.exists() else {}
    if (recorded.get("configured_url") == settings.redis_url
            and recorded.get("configured_online_store") == settings.online_store):
        if recorded["mode"] == "sqlite":
            return OnlineStore("sqlite")
        return OnlineStore("redis", recorded["url"])
    if settings.online_store == "sqlite":
        return OnlineStore("sqlite")
    return OnlineStore("redis", settings.redis_url)
