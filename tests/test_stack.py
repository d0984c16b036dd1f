"""`tailbridge stack up | down | status` as a user runs them: separate state dirs and ports,
so these stacks never touch the session's."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tailbridge.infra import stack
from tailbridge.settings import Settings
from tests.conftest import BACKEND, settings_env

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "tailbridge")


def components(out: subprocess.CompletedProcess) -> dict[str, dict]:
    """The JSON of `stack up/status --json`, by component name."""
    return {c["name"]: c for c in json.loads(out.stdout)}


def tailbridge(settings: Settings, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = settings_env(settings)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture
def own_stack(tmp_path):
    settings = Settings(
        state_dir=tmp_path / "state", data_dir=tmp_path / "data",
        kafka_bootstrap=f"127.0.0.1:{stack.free_port()}",
        milvus_uri=f"http://127.0.0.1:{stack.free_port()}",
        redis_url=f"redis://127.0.0.1:{stack.free_port()}/0",  # nothing answers there
        milvus_engine="milvus",  # the confined Milvus 2.3.5 server: its start, stop and restart are under test
    )
    yield settings
    stack.down(settings)


@pytest.mark.skipif(BACKEND != "embedded", reason="the embedded stack is what `stack up` starts; "
                    "with Docker the session uses containers, but this still runs without Docker (CI)")
def test_up_down_are_idempotent_and_stop_only_what_they_started(own_stack):
    first = tailbridge(own_stack, "stack", "up", "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    started = components(first)
    assert {c["mode"] for c in started.values()} == {"embedded"}
    assert all(c["detail"].startswith("started") for c in started.values())
    pids = {name: int((own_stack.state_dir / "run" / f"{name}.pid").read_text()) for name in stack.COMPONENTS}
    assert pids == {name: c["pid"] for name, c in started.items()}

    second = components(tailbridge(own_stack, "stack", "up", "--json"))
    assert {c["detail"] for c in second.values()} == {"already running"}
    assert pids == {name: c["pid"] for name, c in second.items()}

    status = components(tailbridge(own_stack, "stack", "status", "--json"))
    assert {c["mode"] for c in status.values()} == {"embedded"} and all(c["healthy"] for c in status.values())
    embedded_redis = stack.resolve_online_store(own_stack).redis_url
    assert embedded_redis != own_stack.redis_url and stack.redis_ready(embedded_redis)

    down = tailbridge(own_stack, "stack", "down")
    assert down.returncode == 0 and down.stdout.count("stopped") == 3
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists()
    assert not stack.port_open(*stack.kafka_address(own_stack))
    assert not stack.redis_ready(embedded_redis)
    assert tailbridge(own_stack, "stack", "down").stdout.strip() == "nothing to stop"
    after = tailbridge(own_stack, "stack", "status", "--json")
    assert after.returncode == 1 and {c["mode"] for c in components(after).values()} == {"down"}


def test_external_components_are_used_and_never_stopped(stack_settings, tmp_path):
    # Point a second state dir at the session's running servers: all three are "external".
    settings = stack_settings.model_copy(update={"state_dir": tmp_path / "state"})
    up = tailbridge(settings, "stack", "up", "--json")
    assert up.returncode == 0, up.stdout + up.stderr
    assert {c["mode"] for c in components(up).values()} == {"external"}
    assert tailbridge(settings, "stack", "down").stdout.strip() == "nothing to stop"
    assert stack.kafka_ready(stack_settings) and stack.milvus_ready(stack_settings)


def test_sqlite_fallback_when_redis_is_down_and_not_installed(stack_settings, tmp_path):
    settings = stack_settings.model_copy(update={
        "state_dir": tmp_path / "state", "redis_url": f"redis://127.0.0.1:{stack.free_port()}/0"})
    up = tailbridge(settings, "stack", "up", "--json", path="/nonexistent")  # no redis-server on PATH
    assert up.returncode == 0, up.stdout + up.stderr
    redis = components(up)["redis"]
    assert redis["mode"] == "sqlite" and "redis-server is not installed" in redis["detail"]
    assert stack.resolve_online_store(settings).kind == "sqlite"
    status = tailbridge(settings, "stack", "status", "--json")
    assert status.returncode == 0 and components(status)["redis"]["mode"] == "sqlite"

    applied = tailbridge(settings, "features", "apply")
    assert applied.returncode == 0 and "online store: SQLite" in applied.stdout
    assert stack.sqlite_path(settings).exists()


def test_only_loopback_addresses_count_as_ours_to_start():
    # IP literals resolve without a lookup: this test sends no traffic anywhere.
    assert stack._is_loopback("127.0.0.1") and stack._is_loopback("127.0.0.53") and stack._is_loopback("localhost")
    assert not stack._is_loopback("10.1.2.3") and not stack._is_loopback("192.168.0.10")


def test_milvus_collections_are_searchable_after_a_restart(own_stack):
    """Milvus reopens its collections released (Milvus Lite) or loads them slowly; `stack up`
    loads them. The 2.3.5 server ignores SIGTERM: `down` kills it, and its data survives."""
    from tailbridge.streams import item_index

    stack.up(own_stack)
    client = item_index.connect(own_stack)
    name = item_index.create_collection(client, own_stack, "v-restart", dim=4)
    client.insert(name, [{"item_id": "a", "vector": [1.0, 0, 0, 0], "text": "red sofa", "title": "Red Sofa",
                          "description": "", "brand": "", "category": "Sofas", "category_path": "Sofas", "price": 1.0,
                          "attributes": "{}",
                          "model_version": "v-restart", "updated_ms": 0}])
    client.flush(name)
    started = time.monotonic()
    stack.down(own_stack)
    assert time.monotonic() - started < stack.STOP_GRACE_S["milvus"] + 8
    assert not stack.milvus_socket(own_stack).exists() or not stack.milvus_ready(own_stack)

    milvus = next(s for s in stack.up(own_stack) if s.name == "milvus")
    assert "1 collections loaded" in milvus.detail, milvus.detail
    hits = item_index.connect(own_stack).search(name, data=[[1.0, 0, 0, 0]], anns_field="vector", limit=1,
                                                output_fields=["title"])
    assert hits[0][0]["entity"]["title"] == "Red Sofa"
