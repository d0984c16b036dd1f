"""The drift monitor on the real stack: `tailbridge monitor run` (its own consumer group) reads a
replayed stream with a broken field injected, and the Feast item_stats rows it samples from Redis
lose a feature at the same time; its findings arrive everywhere they should: reports and alerts
in Redis, a DriftAlert on the drift_alerts topic, Feast query_stats rows, Prometheus scores, the
/monitor page (headless Chromium) and `tailbridge monitor report`, with the feature tests and the
ranker's calibration per model version among them.

One partition: the replay is published at once, as a backlog, and the monitor's buckets follow
event time, so the partitions must not be read one after the other here.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from tailbridge.bench.common import CLI, Worker, free_port, settings_env
from tailbridge.feature_repo.redis_rows import RedisRows
from tailbridge.streams.events import DriftAlert, QueryEvent, ServedItem, decode
from tailbridge.streams.monitor import store
from tailbridge.streams.monitor.features import FEATURES
from tailbridge.streams.topics import TOPICS, make_consumer

from tailbridge.synthetic import catalog as synth
from tailbridge.synthetic.drift import drifted
from tailbridge.synthetic.replay import publish
from tailbridge.synthetic.shoppers import simulate
from tests.conftest import stream_namespace, wait_until
from tests.test_search_page import AppServer, missing_browser, require_browser, start_browser

pytestmark = pytest.mark.integration
RATE = 250  # events per second of stream time


class Clock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1 / RATE)
        return self.now


def write_rows(ns, dataset, broken: bool = False) -> None:
    """Static user_context and item_stats rows for the dataset's shoppers and items, as a worker
    would have left them 90 min ago (no worker runs here: the rows stay as written, and their
    freshness lag stays within one of the monitor's lag bins); ``broken``: without ctr_24h."""
    users, items = RedisRows(ns.store, "user_context"), RedisRows(ns.store, "item_stats")
    stamp = int(time.time() * 1000) - 90 * 60_000
    with ns.redis.pipeline(transaction=False) as pipe:
        for i, user in enumerate(dataset.users):
            row = FEATURES["user_context"] | {"session_id": f"s{i}", "session_queries": 1 + i % 4,
                                              "recent_queries": ["sofa"] * (i % 5)}
            pipe.hset(users.key(user.user_id), mapping=users.fields(row, stamp))
        for i, item in enumerate(dataset.items):
            row = FEATURES["item_stats"] | {"impressions_24h": 10 + i % 40, "clicks_24h": i % 7,
                                            "ctr_24h": None if broken else 0.02 + (i % 10) / 100}
            pipe.hset(items.key(item.item_id), mapping=items.fields(row, stamp))
        pipe.execute()


@pytest.fixture(scope="module")
def monitored(stack_settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    with stream_namespace(stack_settings, root, "tbmon", topic_partitions=1, monitor_bucket_seconds=1.0,
                          monitor_warmup_seconds=3.0, monitor_reference_seconds=8.0, monitor_query_vectors="hashed",
                          monitor_metrics_port=free_port(), ranker_version="none") as ns:
        settings = ns.settings
        monitor = Worker(settings, root / "monitor.log", argv=[CLI, "monitor", "run"])
        monitor.start()
        try:
            dataset = synth.generate(items=200, users=20, seed=4)
            write_rows(ns, dataset)
            # on a whole second: each phase (15 s, 3 s) ends where a 1 s bucket does, so the first
            # window of the drift holds drifted events only (its alert is critical, not a mix's warning)
            clock = Clock(datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=2))
            stream = simulate(dataset, seed=1, clock=clock)
            calm = list(itertools.islice(stream, 15 * RATE))
            # 3 s more without drift, read once the monitor compares (searches read before it
            # has its reference count toward no model version): its pages carry the ranker's
            # head probabilities, which the drifted interactions, without positions, cannot use
            tail = list(itertools.islice(stream, 3 * RATE))
            odd = QueryEvent(user_id="u-odd", session_id="s", query_id="q-odd", query="ünïcødé ☃ " * 20,
                             event_time=clock.now, model_versions={"ranker": "never-seen"},
                             served=[ServedItem(item_id="x", position=1, score=1e300)])
            broken = list(itertools.islice(drifted("missing", dataset, seed=2, clock=clock), 5 * RATE))
            # The calm stream first, as a backlog, then the drift once the monitor compares: which
            # of the two topics a backlog is read from first is not fixed, and a search read before
            # the monitor has its reference counts toward the reference, not a model version. The
            # tail's searches go first, so that its interactions find them.
            def phase():
                return (store.read(ns.redis, settings)["status"] or {}).get("phase")

            def seen(kind="events"):
                return (store.read(ns.redis, settings)["status"] or {}).get("counts", {}).get(kind, 0)

            assert publish(settings, calm).errors == []
            wait_until(lambda: phase() == "monitoring", 240, "the monitor to reach its monitoring phase", worker=monitor)
            # the item rows break once the calm stream is read: its rows must not be read broken
            wait_until(lambda: seen() >= len(calm), 120, "the monitor to read the calm stream", worker=monitor)
            write_rows(ns, dataset, broken=True)
            searches = [odd, *(e for e in tail if isinstance(e, QueryEvent))]
            assert publish(settings, searches).errors == []
            wait_until(lambda: seen() >= len(calm) + len(searches), 120, "the monitor to read the tail's searches",
                       worker=monitor)
            report = publish(settings, [*(e for e in tail if not isinstance(e, QueryEvent)), *broken])
            assert report.errors == [], report.errors
            def alerted():
                return {a["metric"] for a in store.read(ns.redis, settings)["alerts"]}

            wait_until(lambda: {"i.position.missing", "f.item_stats.ctr_24h.missing"} <= alerted(), 240,
                       "the monitor's alerts on missing positions and a missing feature", worker=monitor)
            published = len(calm) + 1 + len(tail) + len(broken)  # the two topics are read in no fixed order
            wait_until(lambda: seen() >= published, 120, "the monitor to read every published event", worker=monitor)
            yield ns, monitor, calm
        finally:
            monitor.stop()


def test_reports_alerts_query_stats_and_metrics(monitored):
    ns, monitor, calm = monitored
    settings = ns.settings
    data = store.read(ns.redis, settings)
    status = data["status"]
    assert status["phase"] == "monitoring" and status["alpha_test"] < settings.monitor_alpha_window
    assert status["counts"]["unknown_model_version"] >= 1  # the odd search: counted, not fatal
    alerts = [a for a in data["alerts"] if a["metric"] == "i.position.missing"]
    assert alerts[0]["score"] > alerts[0]["threshold"] and alerts[0]["severity"] == "critical"
    calm_end_ms = calm[-1].event_time.timestamp() * 1000
    assert not [a for a in data["alerts"] if a["end_ms"] <= calm_end_ms], "an alert before the drift"
    assert any(r["outcomes"].get("simulated-noisy-v1", {}).get("searches") for r in data["reports"])
    # the Feast rows it sampled: each feature scored, the broken one alerted
    feature = [a for a in data["alerts"] if a["metric"] == "f.item_stats.ctr_24h.missing"]
    assert feature and feature[0]["score"] > feature[0]["threshold"]
    assert status["counts"]["feature_rows"] > 0 and "f.user_context.session_queries" in status["tests"]
    assert any("f.item_stats.freshness" in r["scores"] and "f.user_context.rows.missing" in r["scores"]
               for r in data["reports"])
    # predicted against observed per model version (the simulated ranker's head probabilities), in
    # the tail's windows (the drifted interactions carry no position to attribute them by)
    simulated = [r["outcomes"]["simulated-noisy-v1"] for r in data["reports"]
                 if r["outcomes"].get("simulated-noisy-v1", {}).get("click_predicted") is not None]
    assert simulated and all(o["click_observed"] < o["click_predicted"] and o["click_calibration_error"] > 0
                             for o in simulated)
    assert max(o["click_observed"] for o in simulated) > 0  # a short window may hold no click

    # the alert on its topic, as a DriftAlert
    consumer = make_consumer(settings, TOPICS["drift_alerts"].topic(settings), group_id=None,
                             consumer_timeout_ms=10_000)
    try:
        published = [decode(r.value, allowed=(DriftAlert,)) for r in consumer]
    finally:
        consumer.close()
    assert "i.position.missing" in {a.metric for a in published}

    # query_stats in Feast, for a query of the calm stream
    query = next(e for e in calm if isinstance(e, QueryEvent) and e.event_time.timestamp() * 1000 > calm_end_ms - 5000)
    from tailbridge.vocab import normalize_query

    def row():
        return ns.store.get_online_features(features=["query_stats:searches_24h", "query_stats:ctr_24h"],
                                            entity_rows=[{"query_key": normalize_query(query.query)}]).to_dict()
    wait_until(lambda: (row()["searches_24h"][0] or 0) >= 1, 30, "query_stats in Feast", worker=monitor)
    assert 0 < row()["ctr_24h"][0] < 1

    metrics = httpx.get(f"http://127.0.0.1:{settings.monitor_metrics_port}/metrics", timeout=10).text
    assert 'tailbridge_drift_score{test="i.position.missing",window="1s"}' in metrics
    assert 'tailbridge_drift_alerts_total{severity="critical",test="i.position.missing"' in metrics
    assert 'tailbridge_drift_score{test="f.item_stats.ctr_24h.missing",window="1s"}' in metrics
    assert 'tailbridge_monitor_outcome{metric="click_calibration_error",version="simulated-noisy-v1"}' in metrics


def test_monitor_report_command_writes_a_self_contained_page(monitored, tmp_path):
    ns, _, _ = monitored
    out = tmp_path / "report.html"
    done = subprocess.run([CLI, "monitor", "report", "--since", "1h", "--out", str(out)], env=settings_env(ns.settings),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 3  # scores, feature rows' scores, outcomes
    assert "i.position.missing" in page and "f.item_stats.ctr_24h.missing" in page and "Bonferroni" in page
    assert "<tr data-version='simulated-noisy-v1' data-head='click'>" in page
    bad = subprocess.run([CLI, "monitor", "report", "--since", "yesterday-ish"], env=settings_env(ns.settings),
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode != 0 and "30m, 2h, 1d" in bad.stdout + bad.stderr


def test_monitor_page_in_chromium(request):
    require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ns, _, _ = request.getfixturevalue("monitored")
    server = AppServer(ns.settings)
    driver = None
    try:
        server.start()
        body = httpx.get(f"{server.url}/monitor/data", params={"minutes": 60}, timeout=30).json()
        assert body["reports"] and body["status"]["phase"] == "monitoring"
        assert httpx.get(f"{server.url}/monitor/data", params={"minutes": -1}, timeout=10).status_code == 422
        assert not missing_browser()
        driver = start_browser()
        driver.get(server.url + "/monitor")
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "yes")
        panel = driver.find_element(By.CSS_SELECTOR, "#scores .chart[data-name='i.position.missing']")
        # red while the newest report still alerts on it; the drift is short, so that may have ended
        alerting_now = any(k.startswith("i.position.missing@") for k in body["reports"][-1]["alerting"])
        assert ("alerting" in panel.get_attribute("class").split()) == alerting_now
        assert len(panel.find_elements(By.CSS_SELECTOR, "polyline.series")) == 2  # both windows drawn
        outcome = driver.find_element(By.CSS_SELECTOR, "#outcomes .chart[data-name='ctr']")
        assert outcome.find_elements(By.CSS_SELECTOR, "polyline.series")
        assert "simulated-noisy-v1" in driver.find_element(By.ID, "versions").text
        assert driver.find_elements(By.CSS_SELECTOR, "#features .chart[data-name='f.item_stats.ctr_24h.missing'] "
                                                     "polyline.series")
        assert not driver.find_elements(By.CSS_SELECTOR, "#scores .chart[data-name^='f.']")  # features apart
        head = driver.find_elements(By.CSS_SELECTOR, "#calibration tbody tr[data-version='simulated-noisy-v1']")
        assert [row.get_attribute("data-head") for row in head] == ["click", "cart", "purchase"]
        rows = driver.find_elements(By.CSS_SELECTOR, "#alerts tbody tr[data-metric='i.position.missing']")
        assert rows and rows[0].find_elements(By.TAG_NAME, "td")[6].text == "critical"
        assert "Bonferroni" in driver.find_element(By.ID, "method").text
        assert not driver.find_element(By.ID, "error").is_displayed()
        problems = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert problems == [], problems
    finally:
        if driver is not None:
            driver.quit()
        server.stop()
