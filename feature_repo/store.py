"""Build the Feast FeatureStore from the settings (no feature_store.yaml needed at run time),
pointing its online store at whatever the stack resolved: Redis, or the SQLite fallback."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from feast import FeatureStore, RepoConfig
from feast.infra.online_stores.redis import RedisOnlineStoreConfig
from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig

from tailbridge.feature_repo.online import OnlineStore, resolve_online_store, sqlite_path
from tailbridge.settings import Settings


def redis_connection_string(url: str) -> str:
    """redis://[:password@]host:port/db -> Feast's 'host:port,db=N[,password=..][,ssl=true]'."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis:// URL: {url!r}")
    parts = [f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}"]
    db = parsed.path.lstrip("/")
    parts.append(f"db={int(db) if db else 0}")
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def repo_config(settings: Settings, online: OnlineStore | None = None) -> RepoConfig:
    online = online or resolve_online_store(settings)
    if online.kind == "redis":
        online_config = RedisOnlineStoreConfig(
            connection_string=redis_connection_string(online.redis_url),
            key_ttl_seconds=settings.redis_key_ttl_seconds or None,
        )
    else:
        path = sqlite_path(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        online_config = SqliteOnlineStoreConfig(path=str(path))
    registry = settings.state_dir / "feast" / f"registry-{settings.feast_project}.db"
    registry.parent.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "offline").mkdir(parents=True, exist_ok=True)
    return RepoConfig(
        project=settings.feast_project,
        provider="local",
        registry=str(registry),
        online_store=online_config,
        offline_store={"type": "file"},
        repo_path=settings.data_dir,  # parquet sources are relative to the data dir
        entity_key_serialization_version=3,
    )


def feature_store(settings: Settings, online: OnlineStore | None = None) -> FeatureStore:
    return FeatureStore(config=repo_config(settings, online))


def apply(store: FeatureStore) -> list[str]:
    """Register entities and views and create their online tables; idempotent."""
    from tailbridge.feature_repo.definitions import ENTITIES, FEATURE_VIEWS

    store.apply([*ENTITIES, *FEATURE_VIEWS])
    return [view.name for view in FEATURE_VIEWS]
