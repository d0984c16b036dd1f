"""Simulate shopper sessions over the demo data: the event stream a search frontend would emit.

Pure (no Kafka): ``simulate`` yields validated pydantic events that ``synthetic.replay.publish``
can send. A pool of ``concurrent_sessions`` sessions is active at once and one of them is
advanced per step, so users' events interleave as they do on a real site. Each session is
one persona issuing 1-4 searches (picked by query frequency and the persona's department /
type affinity, with some reformulations of the previous search). Each search is answered by
a deliberately imperfect ranker (judged items of all grades plus random items, ordered by
grade + noise), shown as impressions, and clicked under a position-biased cascade: a click
needs the position to be examined (decays with rank) and the item's result tile to attract (by
relevance grade, its price against the persona's band, and brand). Carts follow clicks,
purchases follow carts.

The funnel (``_funnel``): a click is decided on the result tile (title, picture, price, brand);
a cart on the product page and a purchase at checkout, which show what the tile does not:
reviews, returns, sizes in stock, delivery cost and time, how the product looks up close.
Each item has a latent ``converts`` (``item_converts``: log-normal, mean 1, the 10th and 90th
percentile items 6x apart) that multiplies its cart rate per click and that nothing a
shopper sees before the click, nor the catalog, carries; and the price against the shopper's
band weighs harder when paying (``CHECKOUT_PRICE_WEIGHT``) than when browsing
(``BROWSE_PRICE_WEIGHT``: a shopper opens an item a little over budget to look at it). So,
as in real shops, some items draw clicks and rarely sell (a good picture, a price that looks
like a deal but is over the shopper's budget at the till, poor reviews) and the click order of
a page is not its purchase order. What an item converts at can only be learned from behaviour
(carts and purchases per click, ``streams.item_stats``), which is the funnel's point.

Determinism: all choices and ids come from one ``random.Random`` seeded from ``seed``; with a
deterministic ``clock`` the whole stream is reproducible.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Callable, Iterator
from datetime import datetime
from itertools import accumulate
from statistics import NormalDist

import orjson

from tailbridge.synthetic.catalog import PRODUCT_TYPES, Item, Persona, SynthDataset, SynthQuery, price_position
from tailbridge.streams.events import CatalogUpsert, InteractionEvent, QueryEvent, ServedItem, _Event, utc_now

RANKER_VERSION = "simulated-noisy-v1"
# Click model parameters: P(click) = examination(position) * attractiveness(grade, browse fit).
EXAMINATION_DECAY = 0.8  # examination = position ** -decay
ATTRACTIVENESS = {3: 0.5, 2: 0.25, 1: 0.1, 0: 0.03}
CART_GIVEN_CLICK = {3: 0.3, 2: 0.15, 1: 0.1, 0: 0.02}  # times the item's converts and checkout fit
PURCHASE_GIVEN_CART = 0.45
BRAND_BOOST = 1.4  # on the click: the tile shows the brand
# How hard the price's distance outside the persona's band (scaled by their price sensitivity)
# weighs: on the tile, and on the product page and at checkout, where the money is spent.
BROWSE_PRICE_WEIGHT = 1.0
CHECKOUT_PRICE_WEIGHT = 3.0
CONVERTS_SPREAD = 0.7  # std-dev of log(converts): exp(2 * 1.2816 * 0.7) = 6x from the 10th to 90th percentile
RANKER_NOISE = 1.0  # std-dev of the noise added to the grade; higher = worse ranker
REFORMULATE = 0.35  # chance a follow-up search stays on the previous product type
FAVOURITE_TYPE = 0.3  # chance a search comes from the persona's favourite types


def catalog_events(dataset: SynthDataset, clock: Callable[[], datetime] | None = None) -> Iterator[CatalogUpsert]:
    """One upsert per item. The event id is a hash of the content, so replaying an unchanged
    catalog is deduplicated downstream while any change gets a new id."""
    clock = clock or utc_now
    for it in dataset.items:
        fields = {"item_id": it.item_id, "title": it.title, "description": it.description,
                  "category_path": list(it.category_path), "brand": it.brand, "price": it.price,
                  "attributes": dict(it.attributes)}
        event_id = hashlib.blake2b(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS), digest_size=16).hexdigest()
        yield CatalogUpsert(event_id=event_id, event_time=clock(), **fields)


class _World:
    """Indexes over the dataset the sessions share (query pickers, graded candidates)."""

    def __init__(self, dataset: SynthDataset):
        self.items: dict[str, Item] = {it.item_id: it for it in dataset.items}
        self.item_ids = sorted(self.items)
        self.queries = sorted((q for q in dataset.queries if dataset.qrels.get(q.query_id)), key=lambda q: q.query_id)
        if not self.queries or not self.item_ids:
            raise ValueError("dataset needs items and queries with judgements to simulate searches")
        self.qrels = dataset.qrels
        by_dept: dict[str, list[SynthQuery]] = {}
        by_type: dict[str, list[SynthQuery]] = {}
        for q in self.queries:
            by_dept.setdefault(self._department(q), []).append(q)
            by_type.setdefault(q.type, []).append(q)
        self.all = self._picker(self.queries)
        self.by_dept = {d: self._picker(qs) for d, qs in by_dept.items()}
        self.by_type = {t: self._picker(qs) for t, qs in by_type.items()}
        self._graded: dict[str, dict[int, list[str]]] = {}

    @staticmethod
    def _department(q: SynthQuery) -> str:
        t = PRODUCT_TYPES.get(q.type)
        return t.department if t else ""

    @staticmethod
    def _picker(qs: list[SynthQuery]) -> tuple[list[SynthQuery], list[float]]:
        return qs, list(accumulate(max(1, q.frequency) for q in qs))

    @staticmethod
    def _draw(picker: tuple[list[SynthQuery], list[float]], rng: random.Random) -> SynthQuery:
        qs, cum = picker
        return qs[min(len(qs) - 1, bisect.bisect_right(cum, rng.random() * cum[-1]))]

    def pick_query(self, persona: Persona, rng: random.Random, previous: SynthQuery | None) -> SynthQuery:
        if previous is not None and rng.random() < REFORMULATE:
            return self._draw(self.by_type[previous.type], rng)
        favourites = [(t, w) for t, w in sorted(persona.type_weights.items()) if t in self.by_type and w > 0]
        if favourites and rng.random() < FAVOURITE_TYPE:
            t = rng.choices([t for t, _ in favourites], [w for _, w in favourites])[0]
            return self._draw(self.by_type[t], rng)
        depts = [(d, w) for d, w in sorted(persona.department_weights.items()) if d in self.by_dept and w > 0]
        if not depts or rng.random() < 0.05:  # a little browsing outside one's interests
            return self._draw(self.all, rng)
        d = rng.choices([d for d, _ in depts], [w for _, w in depts])[0]
        return self._draw(self.by_dept[d], rng)

    def graded(self, query_id: str) -> dict[int, list[str]]:
        if query_id not in self._graded:
            groups: dict[int, list[str]] = {3: [], 2: [], 1: [], 0: []}
            for item_id, grade in sorted(self.qrels[query_id].items()):
                if item_id in self.items:
                    groups.setdefault(grade, []).append(item_id)
            if len(self._graded) > 50_000:  # bounded cache for run-forever mode
                self._graded.clear()
            self._graded[query_id] = groups
        return self._graded[query_id]

    def result_page(self, q: SynthQuery, rng: random.Random, page_size: int) -> list[tuple[str, float]]:
        """An imperfect ranker: judged items of every grade plus random ones, noisily ordered."""
        groups = self.graded(q.query_id)
        quota = {3: 2 * page_size, 2: page_size, 1: max(1, page_size // 2), 0: page_size}
        pool: dict[str, int] = {}
        for grade in sorted(groups, reverse=True):
            members = groups[grade]
            for item_id in rng.sample(members, min(len(members), quota.get(grade, page_size))):
                pool.setdefault(item_id, grade)
        for _ in range(max(1, page_size // 2)):
            item_id = self.item_ids[rng.randrange(len(self.item_ids))]
            pool.setdefault(item_id, self.qrels[q.query_id].get(item_id, 0))
        scored = [(grade + rng.gauss(0.0, RANKER_NOISE), item_id) for item_id, grade in pool.items()]
        scored.sort(key=lambda s: (-s[0], s[1]))
        return [(item_id, round(score, 4)) for score, item_id in scored[:page_size]]


def _price_distance(persona: Persona, item: Item) -> float:
    """How far the item's price sits outside the persona's band, scaled by their sensitivity."""
    if item.type not in PRODUCT_TYPES:
        return 0.0
    pos = price_position(item)
    return persona.price_sensitivity * max(0.0, persona.price_low - pos, pos - persona.price_high)


def item_converts(item_id: str) -> float:
    """The item's latent conversion quality (see the module docstring): a fixed log-normal draw
    per item id, mean 1; not in the catalog, so no feature can read it."""
    u = int.from_bytes(hashlib.blake2b(f"{item_id}:converts".encode(), digest_size=8).digest()) / 2 ** 64
    z = NormalDist().inv_cdf(min(max(u, 1e-12), 1 - 1e-12))
    return math.exp(CONVERTS_SPREAD * z - CONVERTS_SPREAD ** 2 / 2)


def _funnel(persona: Persona, item: Item, grade: int) -> tuple[float, float, float]:
    """The shopper's position-free funnel for an item: p(click | examined) from the tile,
    p(cart | click) from the product page, p(purchase | cart) at checkout."""
    distance = _price_distance(persona, item)
    brand = BRAND_BOOST if item.brand in persona.preferred_brands else 1.0
    click = min(0.95, ATTRACTIVENESS.get(grade, 0.03) * math.exp(-BROWSE_PRICE_WEIGHT * distance) * brand)
    checkout = math.exp(-CHECKOUT_PRICE_WEIGHT * distance)
    cart = min(0.9, CART_GIVEN_CLICK.get(grade, 0.02) * item_converts(item.item_id) * checkout)
    return click, cart, PURCHASE_GIVEN_CART * (0.5 + 0.5 * checkout)


def examination(position: int) -> float:
    """The chance a shopper looks at the item at a 1-based page position (the cascade's decay)."""
    return position ** -EXAMINATION_DECAY


def _predicted(world: _World, persona: Persona, q: SynthQuery, item_id: str) -> dict[str, float]:
    """The simulated ranker's head probabilities: the true ones of this funnel with the item
    examined (position-free, as the real ranker's heads are), for the monitor's calibration."""
    click, cart, purchase = _funnel(persona, world.items[item_id], world.qrels[q.query_id].get(item_id, 0))
    return {"p_click": round(click, 4), "p_cart": round(click * cart, 4),
            "p_purchase": round(click * cart * purchase, 4)}


class GroundTruth:
    """What the simulator knows and a log does not: for a logged (shopper, query text, item), the
    position-free probabilities ``_predicted`` gives (click, cart, purchase with the item
    examined: ``_funnel``, with the item's latent converts), and the examination per position.
    Offline evaluation scores re-ranked pages with them (``models.ranking.evaluation``). A
    search is unknown (None) when its shopper is not one of the dataset's personas or its text
    is not exactly one judged query's."""

    def __init__(self, dataset: SynthDataset):
        self.world = _World(dataset)
        self.personas = {p.user_id: p for p in dataset.users}
        by_text: dict[str, list[SynthQuery]] = {}
        for q in self.world.queries:
            by_text.setdefault(q.text, []).append(q)
        # Two judged queries with one text would make the grade ambiguous: those texts are unknown.
        self.queries = {text: qs[0] for text, qs in by_text.items() if len(qs) == 1}

    def probabilities(self, user_id: str | None, query: str, item_id: str) -> dict[str, float] | None:
        persona, q = self.personas.get(str(user_id)), self.queries.get(query)
        if persona is None or q is None or item_id not in self.world.items:
            return None
        return _predicted(self.world, persona, q, item_id)

    @staticmethod
    def examination(position: int) -> float:
        return examination(position)


def _session(
    world: _World, persona: Persona, session_id: str, rng: random.Random, page_size: int
) -> Iterator[tuple[type[_Event], dict]]:
    user = {"user_id": persona.user_id, "session_id": session_id}
    previous: SynthQuery | None = None
    for _ in range(rng.choices((1, 2, 3, 4), (0.45, 0.3, 0.15, 0.1))[0]):
        q = world.pick_query(persona, rng, previous)
        previous = q
        search_id = f"srch_{rng.getrandbits(64):016x}"
        page = world.result_page(q, rng, page_size)
        served = [ServedItem(item_id=item_id, position=pos, score=score, source="simulated",
                             **_predicted(world, persona, q, item_id))
                  for pos, (item_id, score) in enumerate(page, 1)]
        yield QueryEvent, {**user, "query_id": search_id, "query": q.text, "served": served,
                           "model_versions": {"ranker": RANKER_VERSION}}
        for s in served:
            yield InteractionEvent, {**user, "action": "impression", "query_id": search_id,
                                     "item_id": s.item_id, "position": s.position}
        # Cascade-like scan from the top: examination decays with position.
        for s in served:
            item = world.items[s.item_id]
            click, cart, purchase = _funnel(persona, item, world.qrels[q.query_id].get(s.item_id, 0))
            if rng.random() >= examination(s.position) * click:
                continue
            base = {**user, "query_id": search_id, "item_id": s.item_id, "position": s.position}
            yield InteractionEvent, {**base, "action": "click"}
            if rng.random() >= cart:
                continue
            quantity = 2 if item.price < 20 and rng.random() < 0.2 else 1
            yield InteractionEvent, {**base, "action": "add_to_cart", "price": item.price, "quantity": quantity}
            if rng.random() < purchase:
                yield InteractionEvent, {**base, "action": "purchase", "price": item.price, "quantity": quantity}


def simulate(
    dataset: SynthDataset,
    seed: int,
    sessions: int | None = None,
    concurrent_sessions: int = 20,
    page_size: int = 10,
    clock: Callable[[], datetime] | None = None,
) -> Iterator[_Event]:
    """Yield QueryEvents and InteractionEvents of ``sessions`` shopper sessions (None: forever)."""
    if concurrent_sessions < 1 or page_size < 1:
        raise ValueError("concurrent_sessions and page_size must be >= 1")
    if not dataset.users:
        raise ValueError("dataset has no users to simulate")
    clock = clock or utc_now
    rng = random.Random(f"{seed}:simulate")
    world = _World(dataset)
    users = sorted(dataset.users, key=lambda p: p.user_id)
    active: list[tuple[str, Iterator[tuple[type[_Event], dict]]]] = []
    busy: set[str] = set()
    last_time: dict[str, datetime] = {}
    started = 0
    while True:
        while len(active) < concurrent_sessions and (sessions is None or started < sessions):
            persona = rng.choice(users)
            for _ in range(5):  # prefer a user who is not already mid-session
                if persona.user_id not in busy:
                    break
                persona = rng.choice(users)
            session_id = f"sess_{rng.getrandbits(64):016x}"
            active.append((persona.user_id, _session(world, persona, session_id, rng, page_size)))
            busy.add(persona.user_id)
            started += 1
        if not active:
            return
        i = rng.randrange(len(active))
        user_id, steps = active[i]
        step = next(steps, None)
        if step is None:
            active.pop(i)
            if all(u != user_id for u, _ in active):
                busy.discard(user_id)
            continue
        model, fields = step
        # Never let a user's clock run backwards, whatever the supplied clock does.
        now = clock()
        if user_id in last_time and now < last_time[user_id]:
            now = last_time[user_id]
        last_time[user_id] = now
        yield model(event_id=f"{rng.getrandbits(128):032x}", event_time=now, **fields)
