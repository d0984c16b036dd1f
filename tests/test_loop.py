"""The alignment loop (tailbridge/cli/loop.py): its thresholds, one real iteration on tiny data
(retrain the ranker from the serving version, gate, promote, the handler's ranker follows),
and kill -9 in the middle of an iteration leaving serving on a complete version."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tailbridge.cli.loop import LoopState, due, run_once
from tailbridge.models.registry import Registry
from tailbridge.settings import Settings
from tests.conftest import tiny_demo

torch.set_num_threads(1)


def test_due_on_volume_or_time():
    s = Settings(loop_min_new_searches=100, loop_max_interval_seconds=3600)
    assert due(s, LoopState(None, 0), 5, 0)[0]  # first iteration: anything logged
    assert not due(s, LoopState(1000.0, 50), 50, 9e9)[0]  # nothing new, however long
    assert due(s, LoopState(1000.0, 50), 150, 1001.0) == (True, "100 new searches >= 100")
    assert not due(s, LoopState(1000.0, 50), 149, 1000.0 + 3599)[0]
    assert due(s, LoopState(1000.0, 50), 51, 1000.0 + 3600)[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny demo data with a simulated log and a tiny ranker serving (trained on it)."""
    from tailbridge.models.ranking.training import train
    from tests.test_ranker import TINY, TRAIN

    root = tmp_path_factory.mktemp("loop")
    data = tiny_demo(root / "demo", sessions=80)
    cfg = dataclasses.replace(TRAIN, export_onnx=False)
    train(data, data / "feedback", root / "models" / "ranker", "rk-parent", TINY, cfg, baseline=False,
          say=lambda _: None)
    return root, data


def test_kill_9_mid_iteration_then_a_full_iteration(world):
    from tailbridge.serving.models import load_ranker

    root, data = world
    project = f"tbloop_{uuid.uuid4().hex[:8]}"  # no rewrite store of anyone's
    env = os.environ | {"TAILBRIDGE_DATA_DIR": str(root), "TAILBRIDGE_FEAST_PROJECT": project,
                        "TAILBRIDGE_LOOP_GATE_MIN_PAGES": "0",
                        "TAILBRIDGE_LOOP_GATE_TOLERANCE": "1"}
    loop = subprocess.Popen([str(Path(sys.executable).parent / "tailbridge"), "loop", "--once", "--kinds", "ranker", "--data",
                             str(data), "--feedback", str(data / "feedback")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = root / "models" / ".staging" / "ranker"
    deadline = time.monotonic() + 120
    while not any(staging.glob("*/*")) and loop.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # until the candidate's artifact is being written
    assert loop.poll() is None, "the loop ended before it could be killed"
    os.kill(loop.pid, signal.SIGKILL)
    loop.wait()
    [killed] = list(staging.iterdir())  # the half-written candidate

    settings = Settings(data_dir=root, feast_project=project, loop_gate_min_pages=0, loop_gate_tolerance=1.0)
    registry = Registry(root / "models")
    assert registry.read().serving("ranker").version == "rk-parent"
    assert sorted(p.name for p in (root / "models" / "ranker").iterdir()) == ["rk-parent"]  # nothing half-made
    handler_ranker = load_ranker(settings)  # what a handler starting now would serve
    assert handler_ranker.version == "rk-parent"

    result = run_once(settings, data, data / "feedback", ("ranker",), say=lambda _: None)
    [report] = result["reports"]
    assert result["due"] and report.promoted and report.parent == "rk-parent"
    state = registry.read()
    entry = state.serving("ranker")
    assert entry.version == report.candidate and entry.parent == "rk-parent"
    assert state.get("ranker", "rk-parent").status == "retired"
    assert entry.gate["candidate"]["purchase_ndcg@10"] is not None and entry.gate["serving"] is not None
    assert entry.gate["evidence"]["held_out_searches"] > 0 and entry.data["searches"] > 0
    assert (root / "models" / "ranker" / entry.version / "model.safetensors").is_file()
    assert not killed.exists() and list(staging.iterdir()) == []  # the killed run's leftovers are gone
    handler_ranker.maybe_reload(wait=True)
    assert handler_ranker.version == entry.version  # the handler follows the promotion

    again = run_once(settings, data, data / "feedback", ("ranker",), say=lambda _: None)
    assert not again["due"] and again["reason"] == "no new searches logged"


def test_warm_start_copies_what_matches_and_rebuilds_the_graph():
    from torch import nn

    from tailbridge.models.alignment import warm_start

    def model(graph_rows: int, width: int):
        m = nn.Module()
        m.text, m.head = nn.Linear(4, 4), nn.Linear(4, width)
        m.graph = nn.Module()
        m.graph.table = nn.Parameter(torch.zeros(graph_rows, 2))  # new data: other rows
        return m

    parent, child = model(5, 3), model(5, 2)
    with torch.no_grad():
        for p in parent.parameters():
            p.fill_(1.0)
    assert warm_start(child, parent) == 2  # text.weight, text.bias; head differs in shape; graph rebuilt
    assert torch.equal(child.text.weight, parent.text.weight) and not torch.equal(child.graph.table, parent.graph.table)
    assert not torch.equal(child.head.bias, torch.ones(2))


def test_a_kind_that_does_not_fit_the_iteration_budget_goes_first_next_time():
    from tailbridge.cli.loop import expected_seconds, schedule

    s = Settings(loop_ranker_minutes=3, loop_retriever_minutes=5, loop_rewriter_minutes=3)
    assert schedule(("ranker", "retriever", "rewriter"), []) == ["ranker", "retriever", "rewriter"]
    assert schedule(("ranker", "retriever", "rewriter"), ["rewriter"]) == ["rewriter", "ranker", "retriever"]
    assert schedule(("ranker",), ["rewriter"]) == ["ranker"]  # a kind not asked for stays out
    # Before a kind ever ran: 1.5x its budget; then what its last step took.
    assert expected_seconds(s, LoopState(), "retriever") == 450
    assert expected_seconds(s, LoopState(kind_seconds={"retriever": 200.0}), "retriever") == 200.0


def test_deferred_kinds_run_alone_at_the_next_poll_and_the_thresholds_wait(tmp_path, monkeypatch):
    import tailbridge.cli.loop as loop

    from datetime import UTC, datetime

    settings = Settings(data_dir=tmp_path, loop_iteration_minutes=10, loop_min_new_searches=100)
    ran, clock, cut = [], [0.0], datetime(2026, 1, 1, tzinfo=UTC)

    def step(kind, minutes):
        def run(*_args):
            ran.append(kind)
            clock[0] += minutes * 60
            return loop.KindReport(kind, gate={"promote": False})
        return run

    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(loop, "STEPS", {"ranker": step("ranker", 2), "retriever": step("retriever", 6),
                                        "rewriter": step("rewriter", 4)})
    monkeypatch.setattr("tailbridge.cli.models.sync", lambda *a, **k: [])
    monkeypatch.setattr("tailbridge.models.alignment.log_cutoff", lambda *a: (cut, "q1", 500))
    monkeypatch.setattr("tailbridge.models.alignment.heldout_slice", lambda *a: None)
    monkeypatch.setattr(loop, "due", lambda s, state, n, now: (n - state.searches >= 100, "thresholds"))
    kinds = ("ranker", "retriever", "rewriter")

    first = loop.run_once(settings, tmp_path, tmp_path, kinds, say=lambda _: None)
    assert ran == ["ranker", "retriever"]  # 8 min spent: the rewriter's 4.5 expected do not fit in 10
    assert "deferred" in first["reports"][2].note
    state = loop.read_state(settings)
    assert state.deferred == ["rewriter"] and state.searches == 500 and state.kind_seconds == {"ranker": 120, "retriever": 360}

    ran.clear()
    monkeypatch.setattr("tailbridge.models.alignment.log_cutoff", lambda *a: (cut, "q2", 550))  # 50 new: not due
    second = loop.run_once(settings, tmp_path, tmp_path, kinds, say=lambda _: None)
    assert second["due"] and ran == ["rewriter"] and "deferred" in second["reason"]
    state = loop.read_state(settings)
    assert state.deferred == [] and state.searches == 500  # the 50 new searches still count towards the next
