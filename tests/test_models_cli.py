"""`tailbridge models list | rollback` (tailbridge/cli/models.py): adopting artifacts trained
outside the registry, the table, and rolling the ranker back."""

from __future__ import annotations

import json
import time

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
