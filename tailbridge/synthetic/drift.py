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
  want end up anywhere on the page) and whose scores are on another scale.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from tailbridge.streams.events import InteractionEvent, QueryEvent, ServedItem, _Event
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
                                 source=event.served[old].source) for new, old in enumerate(order, 1)]
            moved.remember(event.query_id, {old + 1: new for new, old in enumerate(order, 1)})
            yield event.model_copy(update={"served": served,
                                           "model_versions": {**event.model_versions, "ranker": SWAPPED_RANKER}})
        elif isinstance(event, InteractionEvent) and event.position is not None and event.query_id in moved:
            yield event.model_copy(update={"position": moved[event.query_id].get(event.position, event.position)})
        else:
            yield event


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
