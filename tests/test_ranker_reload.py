"""The handler's ranker follows the model registry (serving/ranker_reload.py): a promotion or a
rollback swaps the version in place; a version that fails to load leaves the old one serving."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tailbridge.models.registry import ModelVersion, Registry
from tailbridge.serving.ranker_reload import ReloadingRanker


def _fake_ranker(path: Path):
    if path.name == "broken":
        raise FileNotFoundError(path)
    return SimpleNamespace(version=path.name, score=lambda query, candidates, *rest: [path.name] * len(candidates))


def test_follows_promotion_and_rollback_and_survives_a_bad_version(tmp_path):
    registry = Registry(tmp_path)
    for version in ("r1", "r2", "broken"):
        registry.register(ModelVersion("ranker", version, str(tmp_path / version)))
    registry.promote("ranker", "r1")
    ranker = ReloadingRanker(registry, _fake_ranker, _fake_ranker(tmp_path / "r1"), check_every_s=0)
    assert ranker.score("q", [{}]) == ["r1"]

    registry.promote("ranker", "r2")
    ranker.maybe_reload(wait=True)
    assert ranker.version == "r2" and ranker.score("q", [{}, {}]) == ["r2", "r2"]

    registry.promote("ranker", "broken")
    ranker.maybe_reload(wait=True)
    assert ranker.version == "r2"  # the failed load changed nothing

    registry.rollback("ranker")
    ranker.maybe_reload(wait=True)
    assert ranker.version == "r2"
    registry.rollback("ranker")
    ranker.maybe_reload(wait=True)
    assert ranker.version == "r1"


def test_no_search_fails_while_versions_swap(tmp_path):
    import threading
    import time

    registry = Registry(tmp_path)
    versions = [f"r{n}" for n in range(6)]
    for version in versions:
        registry.register(ModelVersion("ranker", version, str(tmp_path / version)))
    registry.promote("ranker", "r0")

    def slow_load(path: Path):
        time.sleep(0.02)  # loading takes a while; searches must not wait for it
        return _fake_ranker(path)

    ranker = ReloadingRanker(registry, slow_load, _fake_ranker(tmp_path / "r0"), check_every_s=0)
    failures, seen, stop = [], set(), threading.Event()

    def search():
        while not stop.is_set():
            try:
                out = ranker.score("q", [{}, {}, {}])
                assert len(set(out)) == 1  # one version scored the whole page
                seen.add(out[0])
            except Exception as exc:  # noqa: BLE001  any failure is the finding
                failures.append(exc)

    threads = [threading.Thread(target=search) for _ in range(4)]
    for t in threads:
        t.start()
    for version in versions[1:]:
        registry.promote("ranker", version)
        deadline = time.monotonic() + 5
        while ranker.version != version and time.monotonic() < deadline:
            time.sleep(0.005)
    stop.set()
    for t in threads:
        t.join()
    assert failures == [] and ranker.version == "r5" and {"r0", "r5"} <= seen
