"""Every benchmark's ``--smoke`` mode, run as a user runs it (``python -m tailbridge.bench.<name>``):
each must exit 0, print its table and write its JSON with the numbers in place, so no
benchmark rots on main. A smoke run's numbers are no measurement: only that they are there,
and sane, is checked.

The two that need a stack run on the session's (``stack_settings``): the stream benchmark with
``--stack-from-env`` (each phase makes and removes a namespace of its own), the serving one in a
namespace made for it here. Both start in the background when the module begins, so their
waits (worker start-up, Kafka, indexing) overlap the model benchmarks, which run on a ranker
and a retriever trained here in seconds the way tests/test_ranker.py and
tests/test_retriever_train.py train them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tailbridge.bench.common import settings_env
from tailbridge.settings import Settings
from tests.conftest import stream_namespace, tiny_demo

STREAM_PHASES = ("throughput", "freshness", "vectors", "stages", "consume")


@dataclass
class SmokeRun:
    """``python -m tailbridge.bench.NAME --smoke --json FILE ARGS`` in the background."""
    name: str
    proc: subprocess.Popen
    log: Path
    json_path: Path

    @classmethod
    def start(cls, name: str, out: Path, *args: str, env: dict[str, str] | None = None) -> SmokeRun:
        log, json_path = out / f"{name}.log", out / f"{name}.json"
        with log.open("wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", f"tailbridge.bench.{name}", "--smoke", "--json",
                                     str(json_path), *args], env=env or os.environ.copy(), cwd=out, stdout=sink,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(name, proc, log, json_path)

    def finish(self, timeout: float) -> tuple[dict, str]:
        """Wait for it; (its JSON, its output)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} --smoke still running after {timeout:.0f} s:\n{self.output()[-3000:]}")
        output = self.output()
        assert rc == 0, f"{self.name} --smoke exited {rc}:\n{output[-5000:]}"
        assert self.json_path.is_file(), f"{self.name} --smoke wrote no {self.json_path}:\n{output[-3000:]}"
        return json.loads(self.json_path.read_text()), output

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the benchmark stops its workers on the way out
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="module")
def stack_runs(stack_settings: Settings, tmp_path_factory) -> Iterator[dict[str, SmokeRun]]:
    """The stream and serving smoke runs, started together on the session's stack."""
    out = tmp_path_factory.mktemp("bench-smoke")
    with stream_namespace(stack_settings, out / "serving-ns", "tbbs") as ns:
        runs = {"streams": SmokeRun.start("streams", out, "--stack-from-env", env=settings_env(stack_settings)),
                "serving": SmokeRun.start("serving", out, env=settings_env(ns.settings))}
        try:
            yield runs
        finally:
            for run in runs.values():
                run.kill()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return tiny_demo(tmp_path_factory.mktemp("bench-demo"), sessions=80)


def test_child_environment_carries_the_settings_and_leaves_none_out(monkeypatch, tmp_path):
    """The bug that broke every stream phase: a None field passed as the string "None", which a
    worker refuses. A child must read back exactly the parent's settings."""
    monkeypatch.setenv("TAILBRIDGE_RANKER_WEIGHTS", '{"click": 1}')  # inherited; these settings say None
    settings = Settings(ranker_weights=None, topic_prefix="tbenv", data_dir=tmp_path / "data")
    env = settings_env(settings)
    assert "TAILBRIDGE_RANKER_WEIGHTS" not in env and "None" not in env.values()
    assert env["TAILBRIDGE_TOPIC_PREFIX"] == "tbenv"
    child = subprocess.run([sys.executable, "-c", "from tailbridge.settings import Settings; "
                            "print(Settings().model_dump_json())"], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert Settings.model_validate_json(child.stdout).model_dump() == settings.model_dump()


# The model benchmarks come first and ask for ``stack_runs`` only to start them: they run beside.


@pytest.mark.integration
def test_retriever_smoke(stack_runs, demo, tmp_path):
    from tailbridge.models.retrieval.train import train
    from tests.test_retriever_train import MODEL, TRAIN

    # One epoch of stage 1 only: a trained artifact in a few seconds (the benchmark times encoding).
    one_epoch = dataclasses.replace(TRAIN, stage1_epochs=1, stage2_epochs=0)
    model = train(demo, tmp_path / "models", "tiny", MODEL, one_epoch, say=lambda _: None)
    result, output = SmokeRun.start("retriever", tmp_path, "--model", str(model), "--data", str(demo),
                                    "--quality").finish(600)
    assert "query encoding, batch 1" in output
    assert result["queries"] == 20 and result["meta"]["smoke"] is True
    runtimes = result["runtimes"]
    assert set(runtimes) == {"tailbridge torch fp32", "tailbridge onnx fp32", "tailbridge onnx int8",
                             "minilm torch fp32 (baseline)"}
    for name, r in runtimes.items():
        assert r["count"] == 20 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"], (name, r)
    assert runtimes["tailbridge onnx fp32"]["min_cosine_to_torch"] > 0.99  # the same model, another runtime
    assert runtimes["tailbridge onnx int8"]["cosine_to_torch"] > 0.9
    assert (model / "query_tower.int8.onnx").is_file()  # exported by the benchmark
    quality = result["quality"]  # trained vs untrained vs the baselines, overall and per stratum
    assert {"bm25", "minilm", "hybrid-rrf", "untrained", "tailbridge"} <= set(quality["systems"])
    assert set(quality["ratios"]) == {"overall", "head", "torso", "tail"}
    assert quality["ratios"]["overall"]["trained_over_best_baseline"] > 0
    assert {"frozen-prefix cache", "stage 1 steps"} <= set(quality["training_phases_seconds"])
    assert "nDCG@10 on" in output and (model.parent / "tiny-untrained" / "model.safetensors").is_file()


@pytest.mark.integration
def test_ranker_relevance_smoke(stack_runs, demo, tmp_path):
    from tailbridge.models.ranking.training import train
    from tests.test_ranker import TINY, TRAIN

    ranker = train(demo, demo / "feedback", tmp_path / "models", "tiny", TINY, TRAIN, say=lambda _: None)
    result, output = SmokeRun.start("ranker_relevance", tmp_path, "--data", str(demo), "--ranker", str(ranker)) \
        .finish(600)
    assert "nDCG@10 re-ranking MiniLM's top 20" in output
    assert result["queries"] > 0 and result["candidates"] == 20 and result["ranker"] == "tiny"
    ndcg = result["ndcg@10"]
    assert {"retrieval order", "ranker alone", "blend, retrieval weight 1"} <= set(ndcg)
    assert all(0 <= v <= 1 for v in ndcg.values()) and ndcg["retrieval order"] > 0  # MiniLM finds relevant items


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_streams_smoke(stack_runs):
    result, output = stack_runs["streams"].finish(840)
    assert "tailbridge stream worker benchmark (--smoke)" in output
    assert result["errors"] == [] and result["meta"]["config"]["mode"] == "smoke"
    assert result["meta"]["stack_from_env"] is True and result["meta"]["phases"] == list(STREAM_PHASES)
    [run] = result["runs"]
    for phase in STREAM_PHASES:
        assert "error" not in run[phase], run[phase]

    throughput = run["throughput"]
    assert throughput["events"] == 2000 and throughput["events_per_s"] > 0 and throughput["publish_events_per_s"] > 0
    assert throughput["workers"] == 2 and len(throughput["memory_workers_final"]) == 2  # they share the partitions
    assert throughput["target_events_per_s"] > 0 and throughput["target_rate_basis"] in ("all workers joined",
                                                                                           "first to last")
    assert throughput["startup_s"] > 0 and throughput["cpu_cores"]["worker"] > 0
    assert throughput["memory_worker"]["peak_mib"] > 0

    freshness = run["freshness"]
    probes = freshness["probes"]
    assert probes["count"] == len(freshness["latencies_ms"]) > 0
    assert 0 < probes["p50_ms"] <= probes["p99_ms"] <= probes["max_ms"]
    assert freshness["kafka_delivery"]["count"] == probes["count"] == freshness["after_delivery"]["count"]

    vectors = run["vectors"]
    assert vectors["updates"]["count"] == vectors["published"] == 60  # 20 updates/s for 3 s, every one seen
    assert 0 < vectors["updates"]["p50_ms"] <= vectors["updates"]["p99_ms"]
    assert vectors["worker_updates_per_s"] > 0

    consume = run["consume"]
    assert consume["events_per_s"] > 0 and consume["probes"]["count"] > 0 and consume["probes"]["p50_ms"] > 0
    assert consume["cpu_us_per_event"] > 0 and consume["plain_aiokafka"]["events_per_s"] > 0

    stages = run["stages"]
    assert stages["behaviour_batch"]["total_ms"] > 0 and stages["behaviour_batch"]["events_per_s_in_process"] > 0
    assert stages["index_batch"]["encode_ms"] > 0 and stages["item_stats_flush"]["items"] > 0
    assert stages["encoder"] == "OnnxMiniLMEncoder"  # the worker's item encoder
    assert stages["behaviour_batch"]["cpu_ms"] > 0 and stages["behaviour_batch"]["redis_write_ms"] > 0

    for phase in ("throughput", "freshness", "vectors"):  # each namespace is removed after its phase
        assert run[phase]["cleanup"]["redis_keys_deleted"] > 0 and "milvus_cleanup_error" not in run[phase]["cleanup"]
    assert result["summary"]["freshness.pooled"]["count"] == probes["count"]
    assert result["targets"]["throughput"]["value"] == throughput["target_events_per_s"]
    # Every target with PASS or MISS and what limits it.
    assert [d["target"] for d in result["diagnosis"]] == ["throughput", "freshness", "vectors"]
    assert all(d["pass"] in (True, False) and d["limit"] for d in result["diagnosis"])
    assert "what limits it" in output and ("PASS" in output or "MISS" in output)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_serving_smoke(stack_runs):
    result, output = stack_runs["serving"].finish(840)
    assert "5 requests/s: latency in ms" in output
    assert result["meta"]["smoke"] is True and result["meta"]["users"] > 0
    [run] = result["runs"]
    [rate] = run["rates"]
    handler, direct = rate["handler"], rate["direct"]
    assert handler["requests"] == 15 and handler["ok"] == 15, handler["errors"]  # 5/s for 3 s, all answered
    assert handler["with_user"] == 15  # every request carried a shopper that has a user context
    assert 0 < handler["e2e"]["p50_ms"] <= handler["e2e"]["p99_ms"]
    assert {"user_context", "embed", "retrieve", "fuse", "total"} <= set(handler["stages"])
    assert handler["overhead"]["count"] == 15 and "app" in handler["cpu_cores"]
    assert direct["ok"] == direct["requests"] == 15 and direct["e2e"]["p50_ms"] > 0
    assert handler["model_versions"]["encoder"] == "minilm-l6-v2"
    block = result["summary"]["5.0"]
    assert block["handler.e2e.p50_ms"] == handler["e2e"]["p50_ms"] and block["pooled.e2e"]["count"] == 15


@pytest.mark.integration
def test_engine_smoke(stack_settings, tmp_path):
    """The engine benchmark on the session's Milvus (whatever engine the stack runs)."""
    result, output = SmokeRun.start("engine", tmp_path, "--milvus-from-env", env=settings_env(stack_settings)).finish(300)
    assert result["items"] == 1000 and result["meta"]["smoke"] is True and "dense   p50" in output
    summary = result["summary"]
    assert 0 < summary["dense_p50_ms"] <= summary["dense_p99_ms"] and 0 < summary["lexical_p50_ms"]
    assert summary["dense_qps"] > 0


def test_monitor_smoke(tmp_path):
    """The drift monitor benchmark, in process (no stack): every drift kind gets a delay or is
    reported missed, the no-drift stream's false alarms and the cost and memory are there."""
    result, output = SmokeRun.start("monitor", tmp_path).finish(300)
    summary = result["summary"]
    assert result["meta"]["smoke"] is True and "drift detection delay" in output
    assert set(summary["delays"]) == {"taste", "vocab", "missing", "constant", "model", "feature-missing",
                                      "feature-constant"}
    # a field or a Feast feature gone missing is always caught
    assert summary["delays"]["missing"]["median_s"] is not None
    assert summary["delays"]["feature-missing"]["median_s"] is not None
    assert summary["windows_evaluated"] > 0 and summary["per_window_rate"] is not None
    assert summary["monitor_events_per_s_median"] > 0 and summary["state_bytes_last_median"] > 0


def test_rewriter_smoke(tmp_path):
    """The rewriter's generation benchmark, in process (no stack), on a tiny model saved here:
    every latency configuration, the worker's path and the offline fill, with the target verdicts."""
    from tests.rewriter_tiny import tiny_generator

    model = tmp_path / "tiny-rewriter"
    tiny_generator(["no-pull dog harness", "velvet sofa for the living room", "cat deterrent mat"]).save(model)
    result, output = SmokeRun.start("rewriter", tmp_path, "--model", str(model)).finish(300)
    assert result["meta"]["smoke"] is True and result["threads"] == 1 and "serving-time target" in output
    latency = result["latency"]
    assert {"fp32 beam 4", "fp32 greedy", "int8 greedy", "int8 beam 2"} <= set(latency)
    for name, r in latency.items():
        assert r["count"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"], (name, r)
    assert latency["int8 greedy"]["same_first_rewrite_as_fp32_greedy"] is not None
    assert result["generator"]["prompt_tokens"]["max"] >= result["generator"]["instruction_tokens"] > 0
    assert result["worker"]["per_query"]["count"] > 0 and result["worker"]["per_query"]["p50_ms"] > 0
    assert result["fill"] and all(f["queries"] > 0 and f["queries_per_s"] > 0 for f in result["fill"].values())
    assert result["targets"]["serving_p50"]["pass"] in (True, False) and len(result["loadavg_end"]) == 3


def test_rewrite_guard_smoke(tmp_path):
    """The rewrite guards' benchmark, in process (no stack, no model): right and wrong rewrites
    of a small synthesised catalog's tail, every route weight and threshold."""
    result, output = SmokeRun.start("rewrite_guard", tmp_path).finish(120)
    assert result["meta"]["smoke"] is True and result["queries"] > 0 and "tail queries" in output
    for kind in ("right", "wrong"):
        rows = result["kinds"][kind]
        assert len(rows) == 8 and all(0 <= r["kept"] <= 1 for r in rows)
        assert [r["kept"] for r in rows if r["min_intent"] is None] == [1.0, 1.0]
    unguarded, guarded = (next(r for r in result["kinds"]["wrong"] if r["route_weight"] == 1.0 and r["min_intent"] == m)
                          for m in (None, 0.8))
    assert unguarded["ndcg@10"] < result["none"]["ndcg@10"] <= guarded["ndcg@10"]  # drift hurts; the rule stops it


def test_behaviour_refresh_smoke(tmp_path):
    """The behaviour refresh benchmark, in process (no stack): a tiny retriever trained without
    the newest items, one refresh from the later log, recall of the next window before and after."""
    result, output = SmokeRun.start("behaviour_refresh", tmp_path, "--out", str(tmp_path / "out")).finish(300)
    assert result["args"]["smoke"] == "True" and "refresh:" in output
    refresh = result["refresh"]
    assert refresh["engagements"] > 0 and refresh["item_rows"] > 0 and refresh["fold_in_seconds"] >= 0
    for when in ("before", "after"):
        recall = result["recall@100"][when]
        assert recall["all_pairs"] > 0 and 0 <= recall["all"] <= 1


def test_loop_smoke(tmp_path):
    """The closed-loop benchmark, in process (no stack): a drifted log, a frozen ranker, one
    ranker step of the loop, held-out nDCG on logged labels and on the simulator's truth."""
    result, output = SmokeRun.start("loop", tmp_path, "--out", str(tmp_path / "out")).finish(300)
    assert result["args"]["smoke"] == "True" and "ranker step:" in output
    assert result["step"]["parent"] == "rk-frozen" and result["step"]["candidate"].startswith("rk-loop-")
    assert result["log"]["held_out_searches"] > 0 and result["log"]["cutoff"] > result["log"]["before_drift_until"]
    for system in ("frozen", "re-aligned", "logged order"):
        scores = result["systems"][system]
        assert 0 <= scores["logged"]["purchase_ndcg@10"] <= 1 and scores["truth"]["pages"] > 0
