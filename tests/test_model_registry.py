"""The model registry (models/registry.py): statuses, lineage, rollback, and that a writer
killed with SIGKILL at any instant leaves a complete registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tailbridge.models.registry import ModelVersion, Registry, RegistryError, entry_from_artifact


def _entry(kind: str, version: str, parent: str | None = None, **metrics) -> ModelVersion:
    return ModelVersion(kind, version, f"/models/{kind}/{version}", parent=parent, metrics=metrics)


def test_promote_retires_the_previous_and_rollback_steps_back(tmp_path):
    registry = Registry(tmp_path)
    registry.register(_entry("ranker", "r1", ndcg=0.5))
    registry.promote("ranker", "r1")
    registry.register(_entry("ranker", "r2", parent="r1", ndcg=0.6))
    assert registry.read().get("ranker", "r2").status == "candidate"
    registry.promote("ranker", "r2", gate={"promote": True, "delta": 0.1})
    registry.register(_entry("ranker", "r3", parent="r2", ndcg=0.4))
    registry.reject("ranker", "r3", gate={"promote": False, "delta": -0.2})

    state = registry.read()
    assert {v.version: v.status for v in state.versions["ranker"].values()} == \
        {"r1": "retired", "r2": "serving", "r3": "rejected"}
    assert state.get("ranker", "r2").gate == {"promote": True, "delta": 0.1}
    assert state.get("ranker", "r2").parent == "r1"
    assert state.serving("retriever") is None  # kinds are independent

    assert registry.rollback("ranker").version == "r1"
    state = registry.read()
    assert state.serving("ranker").version == "r1" and state.get("ranker", "r2").status == "retired"
    with pytest.raises(RegistryError, match="first version"):
        registry.rollback("ranker")
    with pytest.raises(RegistryError, match="unknown model kind"):
        registry.rollback("reranker")


def test_rollback_refuses_when_serving_changed_meanwhile(tmp_path):
    registry = Registry(tmp_path)
    for version in ("a", "b"):
        registry.register(_entry("rewriter", version))
        registry.promote("rewriter", version)
    with pytest.raises(RegistryError, match="changed meanwhile"):
        registry.rollback("rewriter", expected_current="a")
    assert registry.read().serving("rewriter").version == "b"


def test_reconcile_records_what_actually_serves(tmp_path):
    registry = Registry(tmp_path)
    registry.register(_entry("retriever", "v1"))
    registry.promote("retriever", "v1")
    assert not registry.reconcile_serving("retriever", "v1", "/x")
    # A crash after the alias moved to v2 but before the registry recorded it:
    assert registry.reconcile_serving("retriever", "v2", "/models/retriever/v2")
    state = registry.read()
    assert state.serving("retriever").version == "v2" and state.get("retriever", "v1").status == "retired"
    assert state.history["retriever"] == ["v1", "v2"]


def test_entry_from_artifact_reads_the_trainers_files(tmp_path):
    art = tmp_path / "rk-1"
    art.mkdir()
    (art / "metrics.json").write_text(json.dumps({"data": {"rows": 10}, "test_auc": {"click": 0.6}, "history": [1]}))
    (art / "config.json").write_text(json.dumps({"training": {"epochs": 4}}))
    entry = entry_from_artifact("ranker", art, parent="rk-0")
    assert (entry.version, entry.parent, entry.data, entry.settings) == ("rk-1", "rk-0", {"rows": 10}, {"epochs": 4})
    assert entry.metrics == {"test_auc": {"click": 0.6}}


_WRITER = """
import sys
from tailbridge.models.registry import ModelVersion, Registry
registry = Registry(sys.argv[1])
n = 0
while True:
    n += 1
    for kind in ("retriever", "ranker", "rewriter"):
        registry.register(ModelVersion(kind, f"v{n}", f"/m/{kind}/v{n}", parent=f"v{n - 1}", metrics={"pad": "x" * 4000}))
        registry.promote(kind, f"v{n}", gate={"n": n})
    print(n, flush=True)
"""


def test_sigkill_of_a_writer_leaves_a_complete_registry(tmp_path):
    for delay in (0.3, 0.45, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip()  # it wrote at least once
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        state = Registry(tmp_path).read()  # parses: never a half-written file
        serving = {kind: state.serving(kind).version for kind in ("retriever", "ranker", "rewriter")}
        # Each kind has exactly one serving version, the last of its history, and no kind is
        # more than one promotion ahead of the others (they are written in turn).
        for kind, version in serving.items():
            assert [v.version for v in state.versions[kind].values() if v.status == "serving"] == [version]
            assert state.history[kind][-1] == version
        numbers = sorted(int(v[1:]) for v in serving.values())
        assert numbers[-1] - numbers[0] <= 1
