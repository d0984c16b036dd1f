"""`tailbridge models list | rollback` (tailbridge/cli/models.py): adopting artifacts trained
outside the registry, the table, and rolling the ranker back."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from typer.testing import CliRunner

from tailbridge.cli import app
from tailbridge.models.registry import Registry
from tailbridge.settings import get_settings


def _ranker_artifact(root, version: str, auc: float) -> None:
    path = root / "models" / "ranker" / version
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"training": {"epochs": 1}}))
    (path / "metrics.json").write_text(json.dumps({"data": {"rows": 5}, "test_auc": {"click": auc}}))


def test_list_adopts_artifacts_and_rollback_returns_to_the_previous_ranker(tmp_path, monkeypatch):
    _ranker_artifact(tmp_path, "rk-old", 0.55)
    time.sleep(0.01)
    _ranker_artifact(tmp_path, "rk-new", 0.57)
    half = tmp_path / "models" / "ranker" / "rk-killed"  # a training killed before its config: not a version
    half.mkdir()
    monkeypatch.setenv("TAILBRIDGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TAILBRIDGE_FEAST_PROJECT", f"tbmodels_{uuid.uuid4().hex[:8]}")  # no rewrite store of anyone's
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        result = runner.invoke(app, ["models", "list", "--no-check-milvus"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        rows = [line for line in result.output.splitlines() if "rk-" in line]
        assert len(rows) == 2 and "rk-killed" not in result.output
        assert "AUC click 0.5700" in result.output
        state = Registry(tmp_path / "models").read()
        # Without a registry the handler's `auto` served the newest: that is what it records.
        assert state.serving("ranker").version == "rk-new"

        registry = Registry(tmp_path / "models")
        registry.promote("ranker", "rk-old")  # e.g. the loop promoted a version
        result = runner.invoke(app, ["models", "rollback", "ranker"])
        assert result.exit_code == 0, result.output
        assert "serving rk-new again (was rk-old)" in result.output
        assert registry.read().serving("ranker").version == "rk-new"

        result = runner.invoke(app, ["models", "rollback", "ranker"])
        assert result.exit_code == 1 and "first version" in result.output
        result = runner.invoke(app, ["models", "rollback", "rewriter"])
        assert result.exit_code == 1 and "no rewriter version is serving" in result.output
    finally:
        get_settings.cache_clear()  # the next test reads its own settings


@pytest.mark.integration
def test_rewriter_rollback_switches_the_live_rewrites(stack_settings, tmp_path):
    from tailbridge.cli.models import rewrite_writer, rollback, sync
    from tailbridge.models.registry import ModelVersion

    settings = stack_settings.model_copy(update={"data_dir": tmp_path, "feast_project": f"tbrb_{uuid.uuid4().hex[:8]}"})
    writer = rewrite_writer(settings)
    writer.put_many("rw-1", {"cat counter": ["cat deterrent mat"]})
    writer.put_many("rw-2", {"cat counter": ["kitchen counter"], "pvc elbow": ["pvc fitting 90"]})
    registry = Registry(tmp_path / "models")
    for version in ("rw-1", "rw-2"):
        registry.register(ModelVersion("rewriter", version, str(tmp_path / version)))
        writer.promote(version)
        registry.promote("rewriter", version)
    try:
        assert sync(settings, milvus=False) == [] and registry.read().serving("rewriter").version == "rw-2"
        assert rollback(settings, "rewriter") == {"kind": "rewriter", "from": "rw-2", "to": "rw-1"}
        assert writer.serving_version() == "rw-1"
        live = writer._redis.lrange(writer.live_key("cat counter"), 0, -1)
        assert live == [b"cat deterrent mat"] and not writer._redis.exists(writer.live_key("pvc elbow"))
        assert registry.read().serving("rewriter").version == "rw-1"
    finally:
        for key in writer._redis.scan_iter(f"tb:{settings.feast_project}:*"):
            writer._redis.delete(key)
