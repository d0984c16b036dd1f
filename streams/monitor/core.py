"""The drift monitor: events in, one report per closed bucket of stream time out.

Stream (event) time is cut into buckets of ``bucket_s``. The first ``warmup_s`` only learn the
shape of the data: bin edges of each number at its quantiles, the query frequencies that make
head / torso / tail and the known-query set. The next ``reference_s`` are the reference: every
signal is summarised per bucket with those fixed bins. At its end the monitor pins the reference
and calibrates a threshold per test and window length (``models.monitoring.calibration``). From
then on each closed bucket is added to a ring of the last ``max(windows)`` buckets and every test
compares each window (the last w buckets, for each w in ``windows``) with the reference.

Besides events it takes ``FeatureObservation``s: one entity's Feast online row (user_context,
item_stats) as the processor sampled it, routed to the bucket of the event that named the
entity. Each feature gets a histogram of its value (a list's length), its share of missing and
of default values, and each view the share of entities without a row and the row's freshness
lag: tests like every other, with thresholds calibrated on the same reference.

Memory is bounded whatever the stream's length: per bucket a few count vectors and a sample of
``vector_sample`` queries, a ring of buckets, the reference's buckets, and two capped maps (the
recent searches interactions are attributed to, the known queries).

Nothing an event or a feature row carries can stop the monitor: anything odd (a missing optional
field, an unknown model version, a non-finite or extreme score or feature value, a value of the
wrong type, an interaction with no known search, an event of another type) is counted in
``counts`` and the rest of the event is still used.
"""

from __future__ import annotations

import math
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
from tailbridge.models.monitoring import calibration, stats
from tailbridge.streams.events import InteractionEvent, QueryEvent

from tailbridge.vocab import normalize_query

Embed = Callable[[Sequence[str]], np.ndarray]
ACTIONS = ("impression", "click", "add_to_cart", "purchase")
SCRIPTS = ("latin", "digits", "cyrillic", "greek", "arabic", "hebrew", "cjk", "other")
STRATA = ("head", "torso", "tail")
RESULTS = ("zero", "few", "full")  # served items: 0, 1-2, 3+
FEW_RESULTS = 3
OTHER, UNATTRIBUTED = "other", "unattributed"
NUMBERS = ("q.length", "q.top_score", "i.position", "i.price")  # binned at warm-up quantiles
SEVERE = 2.0  # a score this many times its threshold is "critical"
# The ranker's heads, as ServedItem carries them, and fixed bins of a predicted probability: the
# same bins for every model version, so versions compare bin by bin.
HEADS = (("click", "p_click"), ("cart", "p_cart"), ("purchase", "p_purchase"))
PROBABILITY_EDGES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
_PACKED = struct.Struct("<3H")  # a served item's three predictions, 1/65534 steps; 65535: none
_NO_PREDICTION = 65535
# Fixed bins of a feature row's freshness lag in seconds (1 s to 2 days, about x2 apart): a lag
# is not stationary in a way quantile bins could follow (a stalled writer's rows only get older).
FRESHNESS_EDGES = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
                   43200.0, 86400.0, 172800.0)
# per model version: searches, impressions, clicks, carts, purchases, sum 1/position of clicks,
# clicks with a position, degraded searches; then per head: observed, expected (sum of p) and
# impressions with a prediction, per probability bin
_OUTCOME_BASE = 8
_BINS = len(PROBABILITY_EDGES) + 1
OUTCOME_SIZE = _OUTCOME_BASE + 3 * 3 * _BINS


@dataclass(frozen=True)
class MonitorConfig:
    bucket_s: float = 10.0
    windows: tuple[int, ...] = (1, 6)  # window lengths in buckets: 10 s catches broken fields, 60 s subtler drift
    warmup_s: float = 60.0
    reference_s: float = 300.0
    alpha_window: float = 1e-4  # chance that any test alerts on one window evaluation without drift
    draws: int = 400  # bootstrap draws per test and window length
    numeric_bins: int = 10
    score_bins: int = 5  # served-score bins of the click-rate-by-score (calibration) test
    head_share: float = 0.5  # the most frequent queries up to this share of searches are "head"
    torso_share: float = 0.8  # ... up to this, "torso"; the rest (and unseen queries) "tail"
    key_mix: int = 30  # the most frequent queries whose mix is tracked one by one
    vector_sample: int = 32  # queries embedded per bucket
    recent_searches: int = 100_000  # searches remembered to attribute interactions to
    known_queries: int = 200_000
    max_versions: int = 16  # model versions tracked one by one; more are "other"
    min_count: int = 20  # fewer observations in a window: that test is not scored
    max_skew_s: float = 60.0  # a source (queries, interactions) further behind the newest is taken as idle
    seed: int = 0


@dataclass(frozen=True)
class FeatureObservation:
    """One entity's online row of a feature view as the monitor's processor read it.

    ``event_time`` is the stream time of the event that named the entity (it picks the bucket);
    ``values`` maps feature names to their values, None for an entity without a row; ``lag_s``
    is the read's time minus the row's timestamp (NaN when the stored timestamp is unreadable)."""

    view: str
    event_time: datetime
    values: Mapping[str, Any] | None
    lag_s: float | None = None


@dataclass(frozen=True)
class Alert:
    metric: str
    window: str  # e.g. "60s"
    start_ms: int
    end_ms: int
    score: float
    threshold: float
    severity: str  # warning | critical

    def as_json(self) -> dict:
        return asdict(self)


@dataclass
class Threshold:
    value: float
    n_reference: float  # observations in the reference
    n_typical: float  # observations in a typical window of this length
    scales: bool  # statistic shrinks as 1/n: scale the threshold with the window's size

    def at(self, n_window: float) -> float:
        if self.n_reference <= 0:  # the reference never saw this signal: nothing to compare a window with
            return math.inf
        if not self.scales or n_window <= 0:
            return self.value
        return self.value * (1 / self.n_reference + 1 / n_window) / (1 / self.n_reference + 1 / self.n_typical)


@dataclass
class Report:
    """One evaluation: every test on every window ending at ``end_ms``."""

    end_ms: int
    scores: dict[str, dict[str, list]]  # test -> window -> [score, threshold or None]
    outcomes: dict[str, dict[str, float]]  # model version -> rates over the longest window
    alerts: list[Alert]
    alerting: list[str]  # "test@window" above threshold now (onsets are in ``alerts``)

    def as_json(self) -> dict:
        return {"end_ms": self.end_ms, "scores": self.scores, "outcomes": self.outcomes,
                "alerts": [a.as_json() for a in self.alerts], "alerting": self.alerting}


@dataclass(frozen=True)
class Test:
    name: str
    kind: str  # hist | rate | mean | calib | heads | mmd
    signal: str  # the summary it reads
    numeric: bool = False  # a binned number: also a Wasserstein score


def _script(text: str) -> int:
    for ch in text:
        if ch.isalpha():
            if ch.isascii():
                return 0
            code = ord(ch)
            if 0x400 <= code < 0x530:
                return 2
            if 0x370 <= code < 0x400:
                return 3
            if 0x600 <= code < 0x700:
                return 4
            if 0x590 <= code < 0x600:
                return 5
            if 0x2E80 <= code < 0xA000 or 0xAC00 <= code < 0xD7B0:
                return 6
            return 0 if code < 0x250 else 7  # accented Latin is Latin
    return 1 if any(ch.isdigit() for ch in text) else 7


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _pack(value: float | None) -> int:
    """A predicted probability in 16 bits (the recent searches keep one per head and position)."""
    return _NO_PREDICTION if value is None or not 0.0 <= value <= 1.0 else round(value * 65534)


def feature_number(value: Any, default: Any) -> tuple[str, float | None]:
    """(state, number) of one feature value: state is "missing", "bad" (not the type of its
    default, or a non-finite number in it) or "ok"; the number is the value itself, a list's
    length, or None for a string (which has only its missing and default shares)."""
    if value is None:
        return "missing", None
    if isinstance(default, str):
        return ("ok", None) if isinstance(value, str) else ("bad", None)
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)) or any(isinstance(v, float) and not math.isfinite(v) for v in value):
            return "bad", None
        return "ok", float(len(value))
    if isinstance(value, (bool, int, float)) and math.isfinite(value):
        return "ok", float(value)
    return "bad", None


def is_default(value: Any, default: Any) -> bool:
    """Whether a value is its feature's default (a Float32 feature comes back rounded)."""
    if isinstance(default, float) and isinstance(value, (int, float)):
        return abs(value - default) <= 1e-6 * max(1.0, abs(default))
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return len(value) == len(default) == 0 or list(value) == list(default)
    return value == default


class Bucket:
    """Summaries of one span of stream time. ``values`` maps a signal to its count vector."""

    __slots__ = ("index", "outcomes", "texts", "values", "vectors")

    def __init__(self, index: int, dims: dict[str, int], sample: int, rng: random.Random):
        self.index = index
        self.values = {name: [0.0] * size for name, size in dims.items()}
        self.outcomes: dict[str, np.ndarray] = {}  # version -> OUTCOME_SIZE numbers (see there)
        self.texts = stats.Reservoir(sample, rng)
        self.vectors: np.ndarray | None = None

    def vector(self, name: str) -> np.ndarray:
        return np.asarray(self.values[name], dtype=float)


STATISTICS = {"hist": stats.psi, "rate": stats.proportion_z, "mean": stats.mean_z, "calib": stats.calibration_chi2,
              "heads": stats.head_calibration_chi2}


class Monitor:
    def __init__(self, config: MonitorConfig = MonitorConfig(), embed: Embed | None = None,
                 features: Mapping[str, Mapping[str, Any]] | None = None):
        """``features``: feature view -> feature name -> its default value (what a writer puts
        when it knows nothing: 0, an empty list, a rate's prior); None: no feature tests."""
        self.config, self.embed = config, embed
        self.features = {view: dict(names) for view, names in (features or {}).items()}
        self.rng = random.Random(config.seed)
        self.counts: Counter = Counter()
        self.bucket_ms = int(config.bucket_s * 1000)
        self.warmup_buckets = max(1, round(config.warmup_s / config.bucket_s))
        self.reference_buckets = max(2, round(config.reference_s / config.bucket_s))
        self.start: int | None = None  # first bucket index
        self.current: Bucket | None = None  # the bucket of the event being read
        self.open: dict[int, Bucket] = {}  # buckets not closed yet, by index
        self.next_close = 0  # index of the next bucket to close
        self.latest: dict[str, int] = {}  # source (event type) -> its latest bucket index
        self.skew_buckets = max(1, round(config.max_skew_s / config.bucket_s))
        self.ring: list[Bucket] = []  # the last max(windows) closed buckets, oldest first
        self.reference: list[Bucket] = []
        self.thresholds: dict[tuple[str, int], Threshold] = {}
        self.alerting: set[str] = set()
        # query_id -> (version, score bin per position, query key, packed head predictions per position)
        self.recent: dict[str, tuple[str, bytes, str, bytes]] = {}
        # learned at the end of warm-up
        self.samples = {name: stats.Reservoir(2000, self.rng)
                        for name in NUMBERS + ("served_score",) + tuple(self._feature_numbers())}
        self.frequencies: Counter = Counter()
        self.edges: dict[str, list[float]] = {}
        self.dims: dict[str, int] | None = None
        self.known: set[str] = set()
        self.strata: dict[str, int] = {}
        self.slots: dict[str, int] = {}
        self.versions: dict[str, int] = {}
        self.tests: list[Test] = []
        self.gamma = 1.0
        self.ref_vectors: np.ndarray | None = None
        self.ref_kernel_mean = 0.0

    # ------------------------------------------------------------ phases

    @property
    def phase(self) -> str:
        if self.dims is None:
            return "warmup"
        return "monitoring" if self.thresholds else "reference"

    def observe_all(self, events: Iterable) -> list[Report]:
        reports = []
        for event in events:
            reports.extend(self.observe(event))
        return reports

    def observe(self, event) -> list[Report]:
        """Take one event (or feature row); the reports of the buckets it closed (usually none)."""
        self.counts["feature_rows" if isinstance(event, FeatureObservation) else "events"] += 1
        try:
            t_ms = int(event.event_time.timestamp() * 1000)
        except (AttributeError, ValueError, OverflowError):
            self.counts["bad_event_time"] += 1
            return []
        if not isinstance(event, (QueryEvent, InteractionEvent, FeatureObservation)):
            self.counts["ignored_event_type"] += 1  # nor does it move the monitor's clock
            return []
        if isinstance(event, FeatureObservation) and self.start is None:
            self.counts["early_feature_row"] += 1  # the monitor's clock starts with events
            return []
        # a feature row is read for an event already seen: it never moves the watermark
        source = None if isinstance(event, FeatureObservation) else type(event).__name__
        reports = self._advance(t_ms // self.bucket_ms, source)
        try:
            if isinstance(event, QueryEvent):
                self._query(event)
            elif isinstance(event, InteractionEvent):
                self._interaction(event)
            else:
                self._feature_row(event)
        except Exception:  # noqa: BLE001  an event must never stop the monitor: counted, skipped
            self.counts["bad_event"] += 1
        return reports

    def _advance(self, index: int, source: str | None) -> list[Report]:
        """Route the event to its bucket and close every bucket all sources have passed.

        Queries and interactions come from different topics (and partitions), which a consumer
        does not read in step, above all when it catches up on a backlog: a bucket closes only
        when each source's latest event is past it (the watermark), except a source more than
        ``max_skew_s`` behind the newest, which is treated as idle (its events then count as late)."""
        if self.start is None:
            self.start = self.next_close = index
            # a source not seen yet holds the buckets back as one just behind would (it is idle,
            # like any other, once the newest is max_skew_s ahead): a backlog read one topic first
            # must not close the buckets before the other topic's events reach them
            for expected in ("QueryEvent", "InteractionEvent"):
                self.latest.setdefault(expected, index - 1)
        if index < self.next_close:
            self.counts["late_event"] += 1  # its bucket was evaluated already: folded into the oldest open one
            index = self.next_close
        if source is not None:
            self.latest[source] = max(self.latest.get(source, index), index)
        front = max(self.latest.values())
        watermark = min(i for i in self.latest.values() if i >= front - self.skew_buckets)
        reports = []
        if watermark - self.next_close > max(self.config.windows):  # a long silence: a window's worth of it
            self.counts["empty_buckets"] += watermark - self.next_close - max(self.config.windows)
            for stale in [i for i in self.open if i < watermark - max(self.config.windows)]:
                reports.extend(self._close(self.open.pop(stale)))
            self.next_close = watermark - max(self.config.windows)
        while self.next_close < watermark:
            bucket = self.open.pop(self.next_close, None) or self._bucket(self.next_close)
            reports.extend(self._close(bucket))
            self.next_close += 1
        bucket = self.open.get(index)
        if bucket is None:
            bucket = self.open[index] = self._bucket(index)
        self.current = bucket
        return reports

    def _bucket(self, index: int) -> Bucket:
        return Bucket(index, self.dims or {}, self.config.vector_sample, self.rng)

    def _close(self, bucket: Bucket) -> list[Report]:
        age = bucket.index - self.start
        if self.dims is None:
            if age + 1 >= self.warmup_buckets:
                self._learn_shape()
            return []
        if self.embed is not None and bucket.texts.items:
            bucket.vectors = self._embed(bucket.texts.items)
        if not self.thresholds:
            self.reference.append(bucket)
            if len(self.reference) >= self.reference_buckets:
                self._pin()
            return []
        self.ring.append(bucket)
        del self.ring[:-max(self.config.windows)]
        return [self._evaluate(bucket)]

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.asarray(self.embed(list(texts)), dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-9)

    # ------------------------------------------------------------ warm-up -> reference

    def _learn_shape(self) -> None:
        c = self.config
        for name in NUMBERS:
            self.edges[name] = stats.quantile_edges(self.samples[name].items, c.numeric_bins)
        self.edges["served_score"] = stats.quantile_edges(self.samples["served_score"].items, c.score_bins)
        for name in self._feature_numbers():
            self.edges[name] = stats.quantile_edges(self.samples[name].items, c.numeric_bins)
        for view in self.features:
            self.edges[f"f.{view}.freshness"] = list(FRESHNESS_EDGES)
        total, running = sum(self.frequencies.values()), 0
        for key, count in self.frequencies.most_common():
            share = running / total if total else 1.0
            self.strata[key] = 0 if share < c.head_share else 1 if share < c.torso_share else 2
            running += count
        self.known = set(list(self.frequencies)[:c.known_queries])
        self.slots = {key: i for i, (key, _) in enumerate(self.frequencies.most_common(c.key_mix))}
        self.versions = {v: i for i, v in enumerate(sorted(self.versions))}
        del self.samples, self.frequencies  # warm-up only
        bins = {name: len(edges) + 1 for name, edges in self.edges.items()}
        self.dims = {
            "q.stratum": len(STRATA), "q.key_mix": len(self.slots) + 1, "q.new": 2, "q.length": bins["q.length"],
            "q.script": len(SCRIPTS), "q.results": len(RESULTS), "q.rewritten": 2, "q.top_score": bins["q.top_score"],
            "q.top_score.missing": 2, "q.version_mix": len(self.versions) + 1,
            "i.action": len(ACTIONS), "i.position": bins["i.position"], "i.position.missing": 2,
            "i.price": bins["i.price"], "i.price.missing": 2, "i.price.default": 2,
            "o.ctr": 2, "o.cart": 2, "o.purchase": 2, "o.mrr": 3, "o.calibration": 2 * bins["served_score"],
            "q.degraded": 2, **{f"o.head.{head}": 3 * _BINS for head, _ in HEADS},
        }
        # feature values: PSI only (a Wasserstein score each would double what every report holds);
        # the freshness lag also gets its Wasserstein, in seconds
        feature_hist, feature_rates, lags = [], [], []
        for view, names in self.features.items():
            for name, default in names.items():
                signal = f"f.{view}.{name}"
                if not isinstance(default, str):  # strings have no number, only their shares
                    self.dims[signal] = bins[signal]
                    feature_hist.append(signal)
                self.dims[f"{signal}.missing"] = self.dims[f"{signal}.default"] = 2
                feature_rates += [f"{signal}.missing", f"{signal}.default"]
            self.dims[f"f.{view}.rows.missing"] = 2
            self.dims[f"f.{view}.freshness"] = bins[f"f.{view}.freshness"]
            feature_rates.append(f"f.{view}.rows.missing")
            lags.append(f"f.{view}.freshness")
        for bucket in self.open.values():  # opened during warm-up: they start the reference with no counts
            bucket.values = {name: [0.0] * size for name, size in self.dims.items()}
        hist = ["q.stratum", "q.key_mix", "q.script", "q.results", "q.version_mix", "i.action"]
        rates = ["q.new", "q.rewritten", "q.top_score.missing", "q.degraded", "i.position.missing", "i.price.missing",
                 "i.price.default", "o.ctr", "o.cart", "o.purchase"]
        self.tests = ([Test(n, "hist", n) for n in hist] + [Test(n, "hist", n, numeric=True) for n in NUMBERS]
                      + [Test(n, "rate", n) for n in rates] + [Test("o.mrr", "mean", "o.mrr"),
                                                               Test("o.calibration", "calib", "o.calibration")]
                      + [Test(f"o.head.{head}", "heads", f"o.head.{head}") for head, _ in HEADS]
                      + [Test(n, "hist", n) for n in feature_hist] + [Test(n, "hist", n, numeric=True) for n in lags]
                      + [Test(n, "rate", n) for n in feature_rates]
                      + ([Test("q.vector", "mmd", "q.vector")] if self.embed is not None else []))

    def _feature_numbers(self) -> list[str]:
        """The signals of features that have a number (all but strings)."""
        return [f"f.{view}.{name}" for view, names in self.features.items()
                for name, default in names.items() if not isinstance(default, str)]

    def _pin(self) -> None:
        """Calibrate every test on the reference buckets (see ``models.monitoring.calibration``)."""
        c = self.config
        alpha = calibration.bonferroni(c.alpha_window, len(self.tests) * len(c.windows))
        rng = np.random.default_rng(c.seed)
        for test in self.tests:
            for w in c.windows:
                self.thresholds[(test.name, w)] = self._calibrate(test, w, alpha, rng)
        self.alpha_test = alpha
        self.ref_sums = {name: sum(b.vector(name) for b in self.reference) for name in self.dims}
        self.ring = self.reference[-max(c.windows):]  # so the first windows are whole: the latest no-drift buckets

    def _calibrate(self, test: Test, w: int, alpha: float, rng: np.random.Generator) -> Threshold:
        c, r = self.config, len(self.reference)
        if test.kind == "mmd":
            sizes, block = self._reference_blocks()
            null = calibration.mmd_null(block, sizes, w, c.draws, rng)
            n_ref = float(sizes.sum())
            return Threshold(calibration.tail_threshold(null, alpha), n_ref, n_ref / r * w, True)
        buckets = np.stack([b.vector(test.signal) for b in self.reference])
        statistic = STATISTICS[test.kind]
        null = calibration.bootstrap_null(buckets, w, statistic, c.draws, rng)
        n_ref = float(self._size(test, buckets.sum(0)))
        n_typ = n_ref / r * w
        if test.kind == "hist":
            floor = calibration.psi_floor(buckets.shape[1], n_ref, n_typ, alpha)
        elif test.kind in ("calib", "heads"):
            k = buckets.shape[1] // (2 if test.kind == "calib" else 3)
            floor = float(calibration.sstats.chi2.isf(alpha, k) / k)
        else:
            floor = calibration.z_floor(alpha)
        squared = test.kind in ("rate", "mean")  # |z|: its square is the chi-square-like one
        return Threshold(calibration.tail_threshold(null, alpha, floor, squared), n_ref, n_typ, test.kind == "hist")

    def _reference_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """Kernel sums between every pair of reference buckets' query vectors (computed once)."""
        if self.ref_vectors is None:
            parts = [b.vectors if b.vectors is not None else np.zeros((0, 1), np.float32) for b in self.reference]
            dim = max((p.shape[1] for p in parts if len(p)), default=1)
            parts = [p if len(p) else np.zeros((0, dim), np.float32) for p in parts]
            self.ref_vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
            self.ref_sizes = np.array([len(p) for p in parts], dtype=float)
            self.gamma = stats.median_gamma(self.ref_vectors) if len(self.ref_vectors) > 1 else 1.0
            kernel = stats.rbf_kernel(self.ref_vectors, self.ref_vectors, self.gamma)
            self.ref_kernel_mean = float(kernel.mean()) if kernel.size else 0.0
            owner = np.repeat(np.arange(len(parts)), self.ref_sizes.astype(int))
            onehot = np.zeros((len(owner), len(parts)))
            onehot[np.arange(len(owner)), owner] = 1.0
            self.ref_blocks = onehot.T @ kernel @ onehot
        return self.ref_sizes, self.ref_blocks

    @staticmethod
    def _size(test: Test, summary: np.ndarray) -> float:
        """Observations behind a summary: what a window must have to be scored."""
        if test.kind == "hist":
            return float(summary.sum())
        if test.kind == "rate":
            return float(summary[1])
        if test.kind == "mean":
            return float(summary[2])
        if test.kind == "calib":
            return float(summary[len(summary) // 2:].sum())
        if test.kind == "heads":
            return float(summary[2 * len(summary) // 3:].sum())
        return float(len(summary))

    # ------------------------------------------------------------ evaluation

    def _evaluate(self, last: Bucket) -> Report:
        c = self.config
        end_ms = (last.index + 1) * self.bucket_ms
        scores: dict[str, dict[str, list]] = {}
        alerts, alerting = [], set()
        ref_sums = self.ref_sums
        for w in c.windows:
            window = self.ring[-w:]
            label = f"{int(w * c.bucket_s)}s"
            sums = {name: sum(b.vector(name) for b in window) for name in self.dims}
            for test in self.tests:
                score, n = self._score(test, window, sums, ref_sums)
                if score is None or n < c.min_count:
                    continue
                threshold = self.thresholds[(test.name, w)].at(n)
                if not math.isfinite(threshold):
                    self.counts["unreferenced_test"] += 1
                    continue
                scores.setdefault(test.name, {})[label] = [round(score, 6), round(threshold, 6)]
                if test.numeric:
                    w1 = stats.wasserstein_binned(ref_sums[test.signal], sums[test.signal], self.edges[test.name])
                    scores.setdefault(f"{test.name}.wasserstein", {})[label] = [round(w1, 6), None]
                if score > threshold:
                    key = f"{test.name}@{label}"
                    alerting.add(key)
                    if key not in self.alerting:  # an onset; a drift that lasts is not alerted again each bucket
                        alerts.append(Alert(test.name, label, (last.index + 1 - w) * self.bucket_ms, end_ms,
                                            round(score, 6), round(threshold, 6),
                                            "critical" if score >= SEVERE * threshold else "warning"))
        self.alerting = alerting
        self.counts["windows_evaluated"] += 1
        self.counts["alerts"] += len(alerts)
        return Report(end_ms, scores, self._outcomes(self.ring[-max(c.windows):]), alerts, sorted(alerting))

    def _score(self, test: Test, window: list[Bucket], sums: dict, ref_sums: dict) -> tuple[float | None, float]:
        if test.kind == "mmd":
            vectors = [b.vectors for b in window if b.vectors is not None and len(b.vectors)]
            if not vectors or self.ref_vectors is None or not len(self.ref_vectors):
                return None, 0.0
            x = np.concatenate(vectors)
            return stats.mmd2(x, self.ref_vectors, self.gamma, self.ref_kernel_mean), float(len(x))
        summary = sums[test.signal]
        return float(STATISTICS[test.kind](ref_sums[test.signal], summary)), self._size(test, summary)

    @staticmethod
    def _outcomes(window: list[Bucket]) -> dict[str, dict[str, float]]:
        """Per model version: rates of its pages, its share of degraded searches, and per ranker
        head the mean predicted and the observed rate per impression with a prediction and the
        expected calibration error (sum over probability bins of |observed - predicted| / impressions)."""
        totals: dict[str, np.ndarray] = {}
        for bucket in window:
            for version, values in bucket.outcomes.items():
                totals[version] = totals.get(version, 0) + values
        out = {}
        for version, values in totals.items():
            searches, impressions, clicks, carts, purchases, rr, ranked, degraded = values[:_OUTCOME_BASE]
            rates = {"searches": int(searches), "impressions": int(impressions),
                     "ctr": clicks / impressions if impressions else None,
                     "cart_rate": carts / searches if searches else None,
                     "purchase_rate": purchases / searches if searches else None,
                     "mrr": rr / ranked if ranked else None,
                     "degraded_rate": degraded / searches if searches else None}
            for h, (head, _) in enumerate(HEADS):
                start = _OUTCOME_BASE + 3 * _BINS * h
                observed, expected, n = values[start:start + 3 * _BINS].reshape(3, _BINS)
                total = n.sum()
                rates[f"{head}_predicted"] = float(expected.sum() / total) if total else None
                rates[f"{head}_observed"] = float(observed.sum() / total) if total else None
                rates[f"{head}_calibration_error"] = float(np.abs(observed - expected).sum() / total) if total else None
            out[version] = rates
        return out

    # ------------------------------------------------------------ events

    def _version(self, event: QueryEvent) -> str:
        versions = event.model_versions
        label = versions.get("ranker") or ",".join(f"{k}={v}" for k, v in sorted(versions.items())) or "none"
        return label[:200]

    def _query(self, event: QueryEvent) -> None:
        self.counts["queries"] += 1
        key = normalize_query(event.query)
        served = event.served
        top = _finite(served[0].score) if served else None
        if served and top is None and served[0].score is not None:
            self.counts["nonfinite_score"] += 1
        version = self._version(event)
        if self.dims is None:  # warm-up: learn the shape only
            self.frequencies[key] += 1
            self.samples["q.length"].add(len(key.split()))
            if top is not None:
                self.samples["q.top_score"].add(top)
            for item in served:
                if (score := _finite(item.score)) is not None:
                    self.samples["served_score"].add(score)
            if len(self.versions) < self.config.max_versions:
                self.versions[version] = 0
            return
        v = self.current.values
        v["q.stratum"][self.strata.get(key, 2)] += 1
        v["q.key_mix"][self.slots.get(key, len(self.slots))] += 1
        new = v["q.new"]
        new[0] += key not in self.known
        new[1] += 1
        v["q.length"][stats.bin_index(self.edges["q.length"], len(key.split()))] += 1
        v["q.script"][_script(key)] += 1
        v["q.results"][0 if not served else 1 if len(served) < FEW_RESULTS else 2] += 1
        rewritten = v["q.rewritten"]
        rewritten[0] += bool(event.rewrites_used)
        rewritten[1] += 1
        missing = v["q.top_score.missing"]
        missing[0] += top is None
        missing[1] += 1
        if top is not None:
            v["q.top_score"][stats.bin_index(self.edges["q.top_score"], top)] += 1
        slot = self.versions.get(version)
        if slot is None:
            self.counts["unknown_model_version"] += 1
        v["q.version_mix"][len(self.versions) if slot is None else slot] += 1
        degraded = v["q.degraded"]
        degraded[0] += bool(event.degraded)
        degraded[1] += 1
        label = self._tracked(version)
        outcome = self._outcome(label)
        outcome[0] += 1
        outcome[7] += bool(event.degraded)
        edges = self.edges["served_score"]
        bins = bytes(255 if (s := _finite(item.score)) is None else stats.bin_index(edges, s) for item in served[:255])
        heads = b"".join(_PACKED.pack(*(_pack(getattr(item, field)) for _, field in HEADS)) for item in served[:255])
        recent = self.recent
        if len(recent) >= self.config.recent_searches:
            del recent[next(iter(recent))]  # the oldest search
        recent[event.query_id] = (label, bins, key, heads)
        self.current.texts.add(event.query[:512])

    def query_key(self, query_id: str | None) -> str | None:
        """The normalised query of a recent search (after warm-up), if remembered."""
        search = self.recent.get(query_id) if query_id else None
        return search[2] if search else None

    def _tracked(self, version: str) -> str:
        """The version's own label, or "other" once ``max_versions`` are tracked in this bucket."""
        outcomes = self.current.outcomes
        return version if version in outcomes or len(outcomes) < self.config.max_versions else OTHER

    def _outcome(self, label: str) -> np.ndarray:
        outcomes = self.current.outcomes
        if label not in outcomes:
            outcomes[label] = np.zeros(OUTCOME_SIZE)
        return outcomes[label]

    def _interaction(self, event: InteractionEvent) -> None:
        self.counts["interactions"] += 1
        position, price = event.position, event.price
        if self.dims is None:
            if position is not None:
                self.samples["i.position"].add(position)
            if price is not None and event.action in ("add_to_cart", "purchase"):
                self.samples["i.price"].add(price)
            return
        v = self.current.values
        action = ACTIONS.index(event.action)
        v["i.action"][action] += 1
        missing = v["i.position.missing"]
        missing[0] += position is None
        missing[1] += 1
        if position is not None:
            v["i.position"][stats.bin_index(self.edges["i.position"], position)] += 1
        if action >= 2:  # carts and purchases carry the price
            missing = v["i.price.missing"]
            missing[0] += price is None
            missing[1] += 1
            if price is not None:
                default = v["i.price.default"]
                default[0] += price == 0
                default[1] += 1
                v["i.price"][stats.bin_index(self.edges["i.price"], price)] += 1
        search = self.recent.get(event.query_id) if event.query_id else None
        if search is None:
            self.counts["unattributed_interaction"] += 1
            label, bins, heads = self._tracked(UNATTRIBUTED), b"", b""
        else:
            label, bins, _, heads = search
        outcome = self._outcome(label)
        outcome[1 + action] += 1
        if action == 0:  # each rate is per impression
            for name in ("o.ctr", "o.cart", "o.purchase"):
                v[name][1] += 1
        else:
            v[("o.ctr", "o.cart", "o.purchase")[action - 1]][0] += 1
        score_bin = bins[position - 1] if position is not None and position <= len(bins) else 255
        if score_bin != 255 and action <= 1:
            k = len(v["o.calibration"]) // 2
            v["o.calibration"][(k if action == 0 else 0) + score_bin] += 1
        if position is not None and position * _PACKED.size <= len(heads):
            self._heads(v, outcome, action, _PACKED.unpack_from(heads, (position - 1) * _PACKED.size))
        if action == 1 and position is not None:
            rr = 1.0 / position
            mrr = v["o.mrr"]
            mrr[0] += rr
            mrr[1] += rr * rr
            mrr[2] += 1
            outcome[5] += rr
            outcome[6] += 1

    def _heads(self, v: dict, outcome: np.ndarray, action: int, packed: tuple[int, int, int]) -> None:
        """Predicted against observed per head: an impression adds its predicted probability to the
        expected count of its bin (and one impression), a click, cart or purchase one observed
        to the bin of that head's prediction for the same item."""
        for h, value in enumerate(packed):
            if value == _NO_PREDICTION or (action != 0 and action != h + 1):
                continue
            p = value / 65534
            b = stats.bin_index(PROBABILITY_EDGES, p)
            signal = v[f"o.head.{HEADS[h][0]}"]
            start = _OUTCOME_BASE + 3 * _BINS * h
            if action == 0:
                signal[_BINS + b] += p
                signal[2 * _BINS + b] += 1
                outcome[start + _BINS + b] += p
                outcome[start + 2 * _BINS + b] += 1
            else:
                signal[b] += 1
                outcome[start + b] += 1

    def _feature_row(self, row: FeatureObservation) -> None:
        names = self.features.get(row.view)
        if names is None:
            self.counts["unknown_feature_view"] += 1
            return
        values = row.values
        if values is not None and not isinstance(values, Mapping):
            self.counts["bad_feature_row"] += 1
            values = None
        lag = row.lag_s
        if values is not None and (lag is None or not math.isfinite(lag)):
            self.counts["bad_feature_timestamp"] += 1
            lag = None
        elif lag is not None and lag < 0:
            self.counts["feature_row_from_the_future"] += 1  # the writer's clock ahead of the monitor's
            lag = 0.0
        if self.dims is None:  # warm-up: learn the numbers' bins only
            for name in names:
                state, number = feature_number(values.get(name), names[name]) if values is not None else ("missing", None)
                if number is not None and state == "ok":
                    self.samples[f"f.{row.view}.{name}"].add(number)
            return
        v = self.current.values
        prefix = f"f.{row.view}"
        missing_row = v[f"{prefix}.rows.missing"]
        missing_row[0] += values is None
        missing_row[1] += 1
        if values is None:
            return
        if lag is not None:
            v[f"{prefix}.freshness"][stats.bin_index(FRESHNESS_EDGES, lag)] += 1
        for name, default in names.items():
            signal = f"{prefix}.{name}"
            value = values.get(name)
            state, number = feature_number(value, default)
            if state == "bad":
                self.counts["bad_feature_value"] += 1  # counted, and as missing: a broken value
            missing = v[f"{signal}.missing"]
            missing[0] += state != "ok"
            missing[1] += 1
            if state != "ok":
                continue
            is_def = v[f"{signal}.default"]
            is_def[0] += is_default(value, default)
            is_def[1] += 1
            if number is not None:
                if abs(number) > 1e15:
                    self.counts["extreme_feature_value"] += 1  # still binned: the top bin
                v[signal][stats.bin_index(self.edges[signal], number)] += 1
