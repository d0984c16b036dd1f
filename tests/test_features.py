"""Feast apply, write and read against the real online stores: Redis and SQLite."""

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from tailbridge.feature_repo.definitions import FEATURE_VIEWS
from tailbridge.feature_repo.store import apply, feature_store, redis_connection_string
from tailbridge.feature_repo.online import OnlineStore, resolve_online_store

pytestmark = pytest.mark.integration


@pytest.fixture(params=["redis", "sqlite"])
def store(request, stack_settings):
    online = resolve_online_store(stack_settings) if request.param == "redis" else OnlineStore("sqlite")
    assert online.kind == request.param
    store = feature_store(stack_settings, online)
    apply(store)
    yield store
    store.teardown()  # removes this test project's keys / tables


def user_row(user_id: str, clicks: int, at: datetime) -> dict:
    return dict(user_id=user_id, recent_item_ids=["item_1", "item_2"], recent_actions=["click", "impression"],
                recent_action_times_ms=[2, 1], affinity_categories=["Furniture", "Pets"][:clicks],
                affinity_weights=[0.75, 0.25][:clicks],
                recent_queries=["sofa"], session_id="s1", session_queries=1, session_clicks=clicks,
                session_carts=0, session_purchases=0, event_timestamp=at)


def test_apply_registers_every_view(store):
    assert {v.name for v in store.list_feature_views()} == {v.name for v in FEATURE_VIEWS}


def test_write_then_read_online(store):
    now = datetime.now(UTC)
    store.write_to_online_store("user_context", pd.DataFrame([user_row("u1", 1, now), user_row("u2", 5, now)]))
    first = store.get_online_features(features=["user_context:affinity_categories"],
                                      entity_rows=[{"user_id": "u1"}, {"user_id": "u2"}]).to_dict()
    # rows of one write with arrays of different lengths keep their own lengths
    assert first["affinity_categories"] == [["Furniture"], ["Furniture", "Pets"]]
    store.write_to_online_store("user_context", pd.DataFrame([user_row("u1", 2, now + timedelta(seconds=1))]))
    features = ["user_context:session_clicks", "user_context:affinity_categories",
                "user_context:affinity_weights", "user_context:recent_item_ids"]
    got = store.get_online_features(features=features,
                                    entity_rows=[{"user_id": "u1"}, {"user_id": "u2"}, {"user_id": "nobody"}]).to_dict()
    assert got["session_clicks"] == [2, 5, None]  # the newer write wins; unknown users read as missing
    assert got["affinity_categories"][0] == ["Furniture", "Pets"]
    assert got["affinity_weights"][0] == pytest.approx([0.75, 0.25])
    assert got["recent_item_ids"][1] == ["item_1", "item_2"]


def test_item_stats_round_trip(store):
    view = next(v for v in FEATURE_VIEWS if v.name == "item_stats")
    row = {f.name: n / 100 if f.name.startswith(("ctr", "cvr", "cart_rate")) else n
           for n, f in enumerate(view.features, start=1)}  # every field of the view, rates in [0, 1]
    row["ctr_24h"] = 0.25
    store.write_to_online_store("item_stats", pd.DataFrame([dict(item_id="item_9", event_timestamp=datetime.now(UTC),
                                                                  **row)]))
    got = store.get_online_features(features=["item_stats:clicks_24h", "item_stats:ctr_24h"],
                                    entity_rows=[{"item_id": "item_9"}]).to_dict()
    assert got["clicks_24h"] == [row["clicks_24h"]] and got["ctr_24h"] == [pytest.approx(0.25)]


@pytest.mark.parametrize("url, expected", [
    ("redis://127.0.0.1:6379/0", "127.0.0.1:6379,db=0"),
    ("redis://:s3cret@cache.internal:6380/3", "cache.internal:6380,db=3,password=s3cret"),
    ("rediss://cache:6379", "cache:6379,db=0,ssl=true"),
])
def test_redis_url_to_feast_connection_string(url, expected):
    assert redis_connection_string(url) == expected


def test_feature_store_yamls_are_valid_for_the_feast_cli(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from feast.repo_config import load_repo_config

    repo = Path(__file__).parent.parent / "feature_repo"
    redis_config = load_repo_config(repo, repo / "feature_store.yaml")
    assert redis_config.online_store.type == "redis" and redis_config.project == "tailbridge"

    # `feast plan` as a user runs it, on a copy so nothing lands in the checkout.
    shutil.copytree(repo, tmp_path / "feature_repo", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / ".tailbridge" / "feast").mkdir(parents=True)
    feast = Path(sys.executable).parent / "feast"
    out = subprocess.run([feast, "-c", "feature_repo", "-f", "feature_repo/feature_store.sqlite.yaml", "plan"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for view in FEATURE_VIEWS:
        assert f"Created feature view {view.name}" in out.stdout
