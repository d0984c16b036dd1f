"""The drift monitor's logic without a stack (streams/monitor/core.py and its parts): phases,
calibrated thresholds, detection of injected drift (in events and in Feast feature rows), ranker
calibration and degraded share per model version, bad input counted, bounded state."""

from __future__ import annotations

import copy
import itertools
import math
from datetime import UTC, datetime, timedelta

import pytest
from tailbridge.models.monitoring.embed import hashed_trigrams
from tailbridge.streams.events import CatalogDelete, InteractionEvent, QueryEvent, ServedItem
from tailbridge.streams.monitor import report as html_report
from tailbridge.streams.monitor.core import FeatureObservation, Monitor, MonitorConfig
from tailbridge.streams.monitor.features import FEATURES, Sampler
from tailbridge.streams.monitor.query_stats import feature_row

from tailbridge.synthetic import catalog as synth
from tailbridge.synthetic.drift import DriftSpec, FeatureRows, drifted, shifted_tastes
from tailbridge.synthetic.shoppers import simulate
from tailbridge.vocab import PRIOR_CTR, PRIOR_CTR_WEIGHT

START = datetime(2026, 1, 1, tzinfo=UTC)
CONFIG = MonitorConfig(bucket_s=1.0, windows=(1, 3), warmup_s=3.0, reference_s=12.0, draws=200)
RATE = 250  # events per second of stream time
FEATURE_SAMPLE = 16  # users and items per bucket whose rows the monitor reads


class Clock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1 / RATE)
        return self.now


@pytest.fixture(scope="module")
def dataset():
    return synth.generate(items=300, users=30, seed=3)


def with_rows(events, rows: FeatureRows):
    """Each event, then the feature rows the monitor's processor would read for it."""
    for event in events:
        yield event
        yield from rows.observe(event)


@pytest.fixture(scope="module")
def pinned(dataset):
    """A monitor past its reference (15 s of stream) and 8 s of more undrifted stream, with the
    Feast rows of a sample of its users and items (simulated in memory, warmed by 40 s of stream
    before it, so that they are in a steady state)."""
    rows = FeatureRows(dataset, CONFIG.bucket_s, FEATURE_SAMPLE, day_s=1.0)
    rows.warm(itertools.islice(simulate(dataset, seed=11, clock=Clock(START - timedelta(seconds=40))), 40 * RATE))
    clock = Clock(START)
    monitor = Monitor(CONFIG, hashed_trigrams, FEATURES)
    reports = monitor.observe_all(with_rows(itertools.islice(simulate(dataset, seed=1, clock=clock), 23 * RATE), rows))
    return monitor, reports, clock.now, rows


def test_phases_and_calibrated_thresholds(pinned):
    monitor, reports, _, _ = pinned
    assert monitor.phase == "monitoring"
    assert len(monitor.reference) == 12 and len(monitor.ring) == max(CONFIG.windows)
    tests = {t.name for t in monitor.tests}
    assert {"q.key_mix", "q.stratum", "q.new", "q.vector", "q.top_score", "i.position.missing", "i.price",
            "o.ctr", "o.mrr", "o.calibration", "q.version_mix", "q.degraded", "o.head.click", "o.head.purchase",
            "f.user_context.recent_item_ids", "f.user_context.session_id.missing", "f.user_context.rows.missing",
            "f.item_stats.ctr_24h", "f.item_stats.ctr_24h.missing", "f.item_stats.ctr_24h.default",
            "f.item_stats.freshness"} <= tests
    assert "f.user_context.session_id" not in tests  # a string: its missing and default shares only
    assert set(monitor.thresholds) == {(t, w) for t in tests for w in CONFIG.windows}
    assert monitor.alpha_test == pytest.approx(CONFIG.alpha_window / (len(tests) * len(CONFIG.windows)))
    assert all(t.value > 0 for t in monitor.thresholds.values())
    assert 6 <= len(reports) <= 8  # one per closed bucket after the reference
    assert [r.alerts for r in reports] == [[]] * len(reports)  # no drift, no alert
    last = reports[-1]
    assert last.scores["q.key_mix"]["3s"][0] < last.scores["q.key_mix"]["3s"][1]
    assert "q.length.wasserstein" in last.scores  # numbers get a Wasserstein score too
    assert last.outcomes["simulated-noisy-v1"]["searches"] > 0 and 0 < last.outcomes["simulated-noisy-v1"]["ctr"] < 1
    # every feature with rows in the window is scored: its value (and Wasserstein), its shares
    assert {"f.item_stats.impressions_24h", "f.user_context.session_id.default", "f.item_stats.freshness",
            "f.item_stats.freshness.wasserstein", "f.user_context.rows.missing"} <= set(last.scores)
    assert monitor.counts["feature_rows"] > 0 and not monitor.counts["bad_feature_value"]
    # position-free head probabilities against per-impression outcomes: predicted above observed
    simulated = last.outcomes["simulated-noisy-v1"]
    assert 0 < simulated["click_observed"] < simulated["click_predicted"] < 1
    assert simulated["click_calibration_error"] > 0 and simulated["purchase_predicted"] < simulated["click_predicted"]
    assert simulated["degraded_rate"] == 0


# A price rides only on carts and purchases: since the simulator's funnel (a hidden conversion
# quality per item) about 7 per second of this stream, so a broken price needs 6 buckets to
# gather the rows its rate test needs; the other drifts show in every few events.
@pytest.mark.parametrize("kind, metric, buckets", [
    ("missing", "i.position.missing", 3), ("constant", "i.price.default", 6), ("model", "q.version_mix", 3),
    ("vocab", "q.results", 3), ("item_stats:ctr_24h:missing", "f.item_stats.ctr_24h.missing", 3),
    ("user_context:recent_item_ids:constant", "f.user_context.recent_item_ids.default", 3)])
def test_injected_drift_is_alerted_within_a_few_buckets(pinned, dataset, kind, metric, buckets):
    """Event drift (``synthetic.drift``) and a broken Feast feature (missing, or constant at its
    default) from the first drifted bucket on."""
    monitor, _, now, rows = copy.deepcopy(pinned)
    if kind.count(":") == 2:  # view:feature:how
        rows.break_feature(*kind.split(":"))
        events = simulate(dataset, seed=9, clock=Clock(now))
    else:
        events = drifted(kind, dataset, seed=9, clock=Clock(now))
    reports = monitor.observe_all(with_rows(itertools.islice(events, (buckets + 1) * RATE), rows))
    alerted = {a.metric for r in reports[:buckets] for a in r.alerts}
    assert metric in alerted, (kind, alerted)


def test_bad_input_is_counted_and_never_fatal(pinned):
    monitor = copy.deepcopy(pinned[0])
    t = pinned[2]
    odd = [
        QueryEvent(user_id="u", session_id="s", query_id="qx", query="лампа ☃", event_time=t,
                   served=[ServedItem(item_id="i1", position=1, score=float("nan")),
                           ServedItem(item_id="i2", position=2, score=1e300)],
                   model_versions={"ranker": "never-seen-v9"}),
        QueryEvent(user_id="u", session_id="s", query_id="qy", query="x", event_time=t),  # nothing served
        InteractionEvent(action="purchase", user_id="u", session_id="s", item_id="i1", event_time=t),  # no search
        InteractionEvent(action="click", user_id="u", session_id="s", query_id="qx", item_id="i1", position=10_000,
                         event_time=t),
        InteractionEvent(action="add_to_cart", user_id="u", session_id="s", query_id="qx", item_id="i2", position=2,
                         price=1e9, quantity=10_000, event_time=t),
        CatalogDelete(item_id="i1", event_time=t),
        InteractionEvent(action="click", user_id="u", session_id="s", query_id="qx", item_id="i1", position=1,
                         event_time=t - timedelta(seconds=30)),  # late
        object(),  # not an event at all
    ]
    before = monitor.counts.copy()
    for event in odd:
        monitor.observe(event)
    counted = monitor.counts - before
    assert counted["unknown_model_version"] == 2  # "never-seen-v9" and the empty versions ("none")
    assert counted["nonfinite_score"] == 1 and counted["unattributed_interaction"] == 1
    assert counted["ignored_event_type"] == 1 and counted["late_event"] == 1 and counted["bad_event_time"] == 1
    later = t + timedelta(seconds=2)  # both sources (queries, interactions) past the bucket: it closes
    reports = monitor.observe_all([InteractionEvent(action="impression", user_id="u", session_id="s", item_id="i3",
                                                    event_time=later),
                                   QueryEvent(user_id="u", session_id="s", query_id="qz", query="y", event_time=later)])
    assert reports and reports[0].outcomes["never-seen-v9"]["searches"] == 1  # tracked by version all the same


def test_state_is_bounded(dataset):
    config = MonitorConfig(bucket_s=1.0, windows=(1, 3), warmup_s=2.0, reference_s=4.0, draws=50, recent_searches=40,
                           known_queries=25)
    monitor = Monitor(config)
    monitor.observe_all(itertools.islice(simulate(dataset, seed=2, clock=Clock(START)), 12 * RATE))
    assert len(monitor.recent) == 40 and len(monitor.known) <= 25 and len(monitor.ring) == 3
    assert all(len(b.texts.items) <= config.vector_sample for b in monitor.ring)


def test_query_stats_row_by_hand():
    hour = 3_600_000
    counters = {"last_ms": str(30 * hour + 5), "searches:30": "8", "searches:7": "2", "searches:6": "100",
                "clicks:30": "3", "purchases:29": "1"}
    row = feature_row("red sofa", counters)  # hour 6 is 24 h before hour 30: out of the window
    assert row == {"query_key": "red sofa", "searches_24h": 10, "clicks_24h": 3, "purchases_24h": 1,
                   "ctr_24h": pytest.approx((3 + PRIOR_CTR * PRIOR_CTR_WEIGHT) / (10 + PRIOR_CTR_WEIGHT))}


def test_drift_specs_and_taste_shift(dataset):
    assert DriftSpec.parse("taste@90") == DriftSpec("taste", 90.0)
    assert DriftSpec.parse("missing@5m") == DriftSpec("missing", 300.0)
    for bad in ("taste", "nothing@10", "taste@-1", "model@ten"):
        with pytest.raises(ValueError, match="KIND@T"):
            DriftSpec.parse(bad)
    before, after = dataset.users[0], shifted_tastes(dataset).users[0]
    assert sorted(after.department_weights.values()) == sorted(before.department_weights.values())
    assert after.department_weights != before.department_weights and after.type_weights == {}


def test_html_report_is_self_contained(pinned):
    _, reports, _, _ = pinned
    alert = {"metric": "q.new", "window": "3s", "start_ms": 0, "end_ms": 3000, "score": 9.5, "threshold": 4.7,
             "severity": "critical"}
    status = {"phase": "monitoring", "alpha_test": 1e-6, "thresholds": {"a@1s": 1.0}, "counts": {"events": 5},
              "config": {"reference_s": 12, "warmup_s": 3, "bucket_s": 1, "alpha_window": 1e-4}}
    # a few panels: matplotlib is slow to draw the whole grid on a busy CI machine
    shown = ("q.new", "o.ctr", "i.price", "f.item_stats.ctr_24h.missing")
    data = [r.as_json() | {"scores": {k: v for k, v in r.scores.items() if k in shown}} for r in reports]
    page = html_report.render({"reports": data, "alerts": [alert], "status": status}, None)
    # scores, feature rows' scores, outcomes
    assert page.count("data:image/png;base64,") == 3 and "http" not in page.replace("http-equiv", "")
    assert "q.new" in page and "critical" in page and "Bonferroni" in page and "block bootstrap" in page
    assert "<tr data-version='simulated-noisy-v1' data-head='click'>" in page  # predicted vs observed per version


def test_a_signal_missing_from_the_reference_is_not_scored_and_never_fatal(dataset):
    """A reference in which no interaction carried a price leaves the price histogram with no
    observations to compare with; when prices arrive that test is skipped and counted instead of
    dividing by an empty reference (it raised ZeroDivisionError and dead-lettered the batch)."""
    events = list(itertools.islice(simulate(dataset, seed=5, clock=Clock(START)), 24 * RATE))
    cut = events[0].event_time + timedelta(seconds=16)
    stream = [e.model_copy(update={"price": None}) if isinstance(e, InteractionEvent) and e.event_time < cut else e
              for e in events]
    assert any(isinstance(e, InteractionEvent) and e.price is not None for e in stream)
    monitor = Monitor(CONFIG, hashed_trigrams)
    reports = monitor.observe_all(stream)
    assert monitor.phase == "monitoring" and reports
    assert monitor.counts["unreferenced_test"] > 0
    assert all("i.price" not in r.scores for r in reports)
    assert all("q.stratum" in r.scores and "i.action" in r.scores for r in reports)  # the rest is still scored


def _observe_closed(monitor: Monitor, events: list, at: datetime) -> list:
    """Feed events at ``at``, then one query and one interaction a bucket later: the reports these
    two close, the first of which ends with the bucket of ``at``."""
    monitor.observe_all(events)  # may close the bucket before (``at`` may be where one begins)
    later = at + timedelta(seconds=CONFIG.bucket_s)
    return monitor.observe_all([InteractionEvent(action="impression", user_id="u", session_id="s", item_id="z",
                                                 event_time=later),
                                QueryEvent(user_id="u", session_id="s", query_id="q-later", query="y", event_time=later)])


def test_head_calibration_and_degraded_share_per_version_by_hand(pinned):
    """A version's outcome numbers from one search: predicted = mean probability per impression,
    observed = rate per impression, error = sum over probability bins of |observed - predicted|
    over the impressions; degraded share of its searches."""
    monitor = copy.deepcopy(pinned[0])
    t = pinned[2]
    served = [ServedItem(item_id="a", position=1, p_click=0.5, p_cart=0.2, p_purchase=0.1),
              ServedItem(item_id="b", position=2, p_click=0.1, p_cart=0.05, p_purchase=0.01),
              ServedItem(item_id="c", position=3)]  # not scored by the ranker: no prediction
    search = QueryEvent(user_id="u", session_id="s", query_id="q-hand", query="lamp", served=served, event_time=t,
                        model_versions={"ranker": "hand-v1"}, degraded=["rewrites"])
    act = lambda action, item, position: InteractionEvent(action=action, user_id="u", session_id="s",
                                                          query_id="q-hand", item_id=item, position=position,
                                                          price=10.0 if action in ("add_to_cart", "purchase") else None,
                                                          event_time=t)
    events = [search, act("impression", "a", 1), act("impression", "b", 2), act("impression", "c", 3),
              act("click", "a", 1), act("add_to_cart", "a", 1)]
    reports = _observe_closed(monitor, events, t)
    hand = reports[0].outcomes["hand-v1"]
    assert hand["searches"] == 1 and hand["degraded_rate"] == 1.0
    assert hand["click_predicted"] == pytest.approx(0.3, abs=1e-4) and hand["click_observed"] == 0.5
    assert hand["click_calibration_error"] == pytest.approx((abs(1 - 0.5) + abs(0 - 0.1)) / 2, abs=1e-4)
    assert hand["cart_observed"] == 0.5 and hand["purchase_observed"] == 0.0
    assert hand["purchase_calibration_error"] == pytest.approx((0.1 + 0.01) / 2, abs=1e-4)


def test_bad_feature_rows_are_counted_and_never_fatal(pinned):
    """Rows with garbage, non-finite, extreme or wrongly typed values, an unreadable timestamp, a
    row from the future, no row, an unknown view: each counted, the rest of the row still used."""
    monitor = copy.deepcopy(pinned[0])
    t = pinned[2]
    good = {name: default for name, default in FEATURES["item_stats"].items()}
    odd = [
        FeatureObservation("item_stats", t, good | {"ctr_24h": float("nan"), "clicks_24h": 1e300}, lag_s=1.0),
        FeatureObservation("item_stats", t, good | {"cvr_24h": b"\xff\x00garbage", "carts_1h": "three"}, lag_s=2.0),
        FeatureObservation("user_context", t, FEATURES["user_context"] | {"affinity_weights": [0.5, float("inf")],
                                                                          "session_id": 7}, lag_s=math.nan),
        FeatureObservation("user_context", t, FEATURES["user_context"], lag_s=-30.0),
        FeatureObservation("item_stats", t, None),
        FeatureObservation("item_stats", t, ["not", "a", "row"], lag_s=1.0),
        FeatureObservation("no_such_view", t, {"x": 1}, lag_s=1.0),
        FeatureObservation("item_stats", "not a time", good, lag_s=1.0),
    ]
    before = monitor.counts.copy()
    reports = _observe_closed(monitor, odd, t)
    counted = monitor.counts - before
    assert counted["bad_feature_value"] == 5  # NaN, garbage bytes, a string count, inf in a list, an int session id
    assert counted["extreme_feature_value"] == 1 and counted["bad_feature_timestamp"] == 1
    assert counted["feature_row_from_the_future"] == 1 and counted["bad_feature_row"] == 1
    assert counted["unknown_feature_view"] == 1 and counted["bad_event_time"] == 1
    assert not counted["bad_event"]  # nothing raised inside the monitor
    assert reports and "f.item_stats.ctr_24h.missing" in reports[0].scores


def test_sampler_is_bounded_per_bucket():
    sampler = Sampler(bucket_s=1.0, per_bucket=3)
    at = lambda s: START + timedelta(seconds=s)
    picks = [sampler.pick(InteractionEvent(action="click", user_id=f"u{i % 5}", session_id="s", item_id=f"i{i}",
                                           event_time=at(i / 20))) for i in range(20)]  # one bucket
    flat = [p for batch in picks for p in batch]
    assert sorted(e for v, e in flat if v == "user_context") == ["u0", "u1", "u2"]
    assert [e for v, e in flat if v == "item_stats"] == ["i0", "i1", "i2"]
    assert sampler.pick(QueryEvent(user_id="u9", session_id="s", query_id="q", query="x", event_time=at(1.5))) \
        == [("user_context", "u9")]  # the next bucket samples afresh
    for second in range(2, 40):
        sampler.pick(QueryEvent(user_id="u", session_id="s", query_id="q", query="x", event_time=at(second)))
    assert len(sampler.picked) == Sampler.KEEP
