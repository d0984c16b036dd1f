"""Drift injected into the simulated shopper stream at a known time, for the drift monitor's
benchmark and for `tailbridge data replay --drift KIND@T`.

Before ``T`` seconds of stream time the stream is the ordinary simulation; from then on it is
a fresh simulation (another seed) changed by one kind of drift:

- ``taste``: shoppers' tastes shift: every persona's department interests move to the next
  department (and favourite product types are forgotten), so other queries are asked;
- ``vocab``: a new product line the catalog does not carry: half the searches use words never
  seen before and find at most two products;
- ``missing``: a broken field: interactions lose their position;
- ``constant``: a broken field: carts and purchases carry a price of 0;
- ``model``: a model swap: a new ranker version whose pages are shuffled (the items shoppers
  want end up anywhere on the page), whose scores are on another scale and whose head
  probabilities are overconfident.

A broken Feast feature is not in the events: the worker computes the rows from them. For the
monitor's tests and benchmark ``FeatureRows`` keeps the rows the worker would write for a
simulated stream in memory (with the worker's own fold) and hands the monitor the rows of the
entities its processor would sample; ``break_feature`` makes one feature missing or constant
(its default) from then on. On a live stack the same drift is a writer that breaks the rows.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tailbridge.models.data import user_context
from tailbridge.streams import item_stats
from tailbridge.streams.events import InteractionEvent, QueryEvent, ServedItem, _Event
from tailbridge.streams.monitor.core import FeatureObservation
from tailbridge.streams.monitor.features import FEATURES, Sampler
from tailbridge.synthetic.catalog import SynthDataset
from tailbridge.synthetic.shoppers import simulate

KINDS = ("taste", "vocab", "missing", "constant", "model")
SWAPPED_RANKER = "swapped-ranker-v2"
NEW_LINE = ("drone", "quadcopter", "gimbal", "propeller guard", "fpv goggles", "smart ring", "e-scooter",
            "lidar sensor", "vr headset", "controller grip")
NEW_WORDS = ("foldable", "4k", "long range", "beginner", "spare", "carbon", "waterproof", "mini", "pro", "kit")
REMEMBERED = 50_000  # searches whose later interactions a drift still rewrites
_SPEC = re.compile(r"^(?P<kind>[a-z]+)@(?P<value>\d+(?:\.\d+)?)(?P<unit>[sm]?)$")


@dataclass(frozen=True)
class DriftSpec:
    kind: str
    at_s: float  # seconds of stream time after the first behaviour event

    @classmethod
    def parse(cls, text: str) -> DriftSpec:
        """``KIND@T``: T in seconds, or with ``s`` / ``m`` (``taste@5m``)."""
        match = _SPEC.match(text.strip())
        if not match or match["kind"] not in KINDS:
            raise ValueError(f"drift {text!r}: expected KIND@T with KIND one of {', '.join(KINDS)} and T seconds "
                             "(or 90s, 5m)")
        return cls(match["kind"], float(match["value"]) * (60 if match["unit"] == "m" else 1))


def shifted_tastes(dataset: SynthDataset) -> SynthDataset:
    """Each persona's interest in a department goes to the next department (in name order)."""
    departments = sorted({d for user in dataset.users for d in user.department_weights})
    following = {d: departments[(i + 1) % len(departments)] for i, d in enumerate(departments)}
    users = [dataclasses.replace(u, department_weights={following[d]: w for d, w in u.department_weights.items()},
                                 type_weights={}) for u in dataset.users]
    return dataclasses.replace(dataset, users=users)


class _Remembered(dict):
    """A capped map of recent searches (the oldest forgotten first)."""

    def remember(self, key, value) -> None:
        if len(self) >= REMEMBERED:
            del self[next(iter(self))]
        self[key] = value


def _new_vocabulary(events: Iterator[_Event], rng: random.Random) -> Iterator[_Event]:
    kept = _Remembered()  # query_id -> the items still served
    for event in events:
        if isinstance(event, QueryEvent) and rng.random() < 0.5:
            text = f"{rng.choice(NEW_WORDS)} {rng.choice(NEW_LINE)}"
            served = event.served[:rng.randrange(3)]
            kept.remember(event.query_id, {item.item_id for item in served})
            yield event.model_copy(update={"query": text, "served": served})
        elif isinstance(event, InteractionEvent) and event.query_id in kept:
            if event.item_id in kept[event.query_id]:
                yield event
        else:
            yield event


def _model_swap(events: Iterator[_Event], rng: random.Random) -> Iterator[_Event]:
    moved = _Remembered()  # query_id -> old position -> new position
    for event in events:
        if isinstance(event, QueryEvent):
            order = list(range(len(event.served)))
            rng.shuffle(order)  # order[new - 1] is the old index
            scores = sorted((round(rng.random(), 4) for _ in order), reverse=True)
            served = [ServedItem(item_id=event.served[old].item_id, position=new, score=scores[new - 1],
                                 source=event.served[old].source, **_overconfident(event.served[old]))
                      for new, old in enumerate(order, 1)]
            moved.remember(event.query_id, {old + 1: new for new, old in enumerate(order, 1)})
            yield event.model_copy(update={"served": served,
                                           "model_versions": {**event.model_versions, "ranker": SWAPPED_RANKER}})
        elif isinstance(event, InteractionEvent) and event.position is not None and event.query_id in moved:
            yield event.model_copy(update={"position": moved[event.query_id].get(event.position, event.position)})
        else:
            yield event


def _overconfident(item: ServedItem) -> dict[str, float | None]:
    """The swapped ranker's head probabilities: three times the old model's (capped at 1)."""
    return {name: None if (p := getattr(item, name)) is None else min(1.0, round(3 * p, 4))
            for name in ("p_click", "p_cart", "p_purchase")}


def _broken(events: Iterator[_Event], kind: str) -> Iterator[_Event]:
    for event in events:
        if isinstance(event, InteractionEvent):
            if kind == "missing" and event.position is not None:
                event = event.model_copy(update={"position": None})
            elif kind == "constant" and event.price is not None:
                event = event.model_copy(update={"price": 0.0})
        yield event


def drifted(kind: str, dataset: SynthDataset, seed: int, clock: Callable[[], datetime] | None = None) -> Iterator[_Event]:
    """The simulated stream with ``kind`` of drift from its first event."""
    if kind not in KINDS:
        raise ValueError(f"unknown drift {kind!r} (one of {', '.join(KINDS)})")
    if kind == "taste":
        return simulate(shifted_tastes(dataset), seed=seed, clock=clock)
    events = simulate(dataset, seed=seed, clock=clock)
    rng = random.Random(f"{seed}:drift:{kind}")
    if kind == "vocab":
        return _new_vocabulary(events, rng)
    if kind == "model":
        return _model_swap(events, rng)
    return _broken(events, kind)


def with_drift(dataset: SynthDataset, seed: int, spec: DriftSpec,
               clock: Callable[[], datetime] | None = None) -> Iterator[_Event]:
    """The ordinary simulation until ``spec.at_s`` after its first event, then ``drifted``."""
    start: datetime | None = None
    for event in simulate(dataset, seed=seed, clock=clock):
        start = start or event.event_time
        if event.event_time - start >= timedelta(seconds=spec.at_s):
            break
        yield event
    yield from drifted(spec.kind, dataset, seed + 1, clock)


class FeatureRows:
    """The ``user_context`` and ``item_stats`` rows the worker would write for a simulated
    stream, in memory, and the ones the monitor's processor would read: ``observe(event)`` folds
    the event (the worker's ``user_context.apply`` and item counters) and returns the sampled
    entities' rows as ``FeatureObservation``s. A row's timestamp is its entity's latest event
    (the worker writes within about a second), so the lag is in stream time.

    A live system's rows are in a steady state; a simulation starts from none. ``warm`` folds an
    earlier stretch of stream first (shoppers' recent items fill up), and the worker's clock runs
    fast for the fold: a day of it is ``day_s`` seconds of stream time, so the item counters'
    24 h windows and the affinities' 3-day half-life reach their steady state within the warm-up
    instead of growing through the whole benchmark."""

    def __init__(self, dataset: SynthDataset, bucket_s: float, per_bucket: int, day_s: float = 5.0):
        self.scale = 86_400 / day_s
        self.origin_ms: int | None = None
        self.category = {item.item_id: item.category_path[-1] for item in dataset.items}
        self.sampler = Sampler(bucket_s, per_bucket)
        self.users: dict[str, tuple[dict, int]] = {}  # user -> (state, row ms)
        self.items: dict[str, tuple[dict, int]] = {}  # item -> (counters, row ms)
        self.broken: tuple[str, str, str] | None = None  # (view, feature, "missing" | "constant")

    def break_feature(self, view: str, feature: str, kind: str) -> None:
        if feature not in FEATURES.get(view, {}) or kind not in ("missing", "constant"):
            raise ValueError(f"no feature {view}:{feature} to break, or kind {kind!r} not missing / constant")
        self.broken = (view, feature, kind)

    def warm(self, events) -> None:
        """Fold events without sampling any row."""
        for event in events:
            self._fold(event, user_context.epoch_ms(event.event_time))

    def observe(self, event: _Event) -> list[FeatureObservation]:
        picks = self.sampler.pick(event)
        event_ms = user_context.epoch_ms(event.event_time)
        self._fold(event, event_ms)
        return [self._row(view, entity, event.event_time, event_ms) for view, entity in picks]

    def _fold(self, event: _Event, event_ms: int) -> None:
        """The worker's fold of one event, on the fast clock (``scaled_ms``)."""
        if self.origin_ms is None:
            self.origin_ms = event_ms
        scaled_ms = self.origin_ms + int((event_ms - self.origin_ms) * self.scale)
        if isinstance(event, (QueryEvent, InteractionEvent)):
            state, _ = self.users.get(event.user_id) or (user_context.new_state(), 0)
            category = self.category.get(event.item_id) if isinstance(event, InteractionEvent) else None
            fast = event.model_copy(update={"event_time": datetime.fromtimestamp(scaled_ms / 1000, UTC)})
            user_context.apply(state, fast, category)
            self.users[event.user_id] = (state, event_ms)
        if isinstance(event, InteractionEvent):
            counters, _ = self.items.get(event.item_id) or ({}, 0)
            for field in item_stats.bucket_fields(event.action, scaled_ms):
                counters[field] = counters.get(field, 0) + 1
            if len(counters) > 400:  # drop buckets out of their window, as the worker's flush does: bounded
                for field in item_stats.stale_fields(counters, scaled_ms):
                    del counters[field]
            counters[item_stats.LAST_EVENT_FIELD] = max(int(counters.get(item_stats.LAST_EVENT_FIELD, 0)), scaled_ms)
            self.items[event.item_id] = (counters, event_ms)

    def _row(self, view: str, entity: str, event_time: datetime, now_ms: int) -> FeatureObservation:
        if view == "user_context":
            kept = self.users.get(entity)
            values = user_context.feature_row(entity, kept[0]) if kept else None
        else:
            kept = self.items.get(entity)
            values = item_stats.feature_row(entity, kept[0]) if kept else None
        if values is None:
            return FeatureObservation(view, event_time, None)
        if self.broken and self.broken[0] == view:
            _, feature, kind = self.broken
            values[feature] = None if kind == "missing" else FEATURES[view][feature]
        return FeatureObservation(view, event_time, values, (now_ms - kept[1]) / 1000)
