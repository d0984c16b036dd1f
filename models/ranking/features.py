"""What a candidate, the query and the shopper's context contribute to the ranker besides the
text encodings. One module computes them for training rows and for serving's candidates.

* Query x item (``QUERY_FEATURES``), from the query text and the product: the share of the
  query's terms the product's title, brand, category and attribute values contain, whether its
  leaf category and brand are named, whether the attribute values the query asks for (a colour,
  a size: words that are attribute values somewhere in the catalog) are this product's, and its
  price against a price cap the query states ("under $50", "max 30 bucks"). The late-interaction
  text encoder cannot read a number or check a constraint; these say what makes an item an exact
  match rather than a substitute.
* Item behaviour (``ITEM_FEATURES``): ``ctr_24h``, ``cvr_24h``, ``log1p(purchases_24h)`` and the
  item's conversion after the click over a week, ``cart_rate_7d`` and ``cvr_7d`` (carts and
  purchases per click), exactly the stats serving reads for its candidates from the Feast
  ``item_stats`` view (the smoothing priors for an item without a row). Whether a clicked item
  sells depends on what the product page and checkout show (reviews, returns, delivery) and no
  text or catalog field says: the per-click rates are how the cart and purchase heads learn it.
* User x item (``USER_FEATURES``), from the Feast ``user_context`` row: affinity to the item's
  leaf category, whether the shopper recently clicked / carted / bought it, its price against
  their recent items' (log ratio to their median price, and the gap between price levels
  within categories), and the share of their recent items of its brand. All 0 when there is no
  user, so the anonymous path is the same model, not a fallback.

A price level is a price's position among its leaf category's price quantiles (``Catalog``),
so prices compare across categories.
"""

from __future__ import annotations

import bisect
import functools
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tailbridge.models.retrieval.model import category_affinity
from tailbridge.vocab import ENGAGEMENT

QUERY_FEATURES = ("query_terms_in_item", "leaf_named", "brand_named", "asked_values_matched", "asked_value_missing",
                  "has_price_cap", "over_price_cap", "log_price_vs_cap")
ITEM_FEATURES = ("ctr_24h", "cvr_24h", "log1p_purchases_24h", "cart_rate_7d", "cvr_7d")
USER_FEATURES = ("has_user", "category_affinity", "recently_clicked", "recently_carted", "recently_purchased",
                 "log_price_vs_recent_median", "price_level_vs_recent", "abs_price_level_vs_recent", "brand_share")
FEATURES = QUERY_FEATURES + ITEM_FEATURES + USER_FEATURES
PRICE_RATIO_CLIP = 3.0
PRICE_QUANTILES = 21
PRICE_TIE = 1e-6  # log prices this close are one price (float32 keeps ~7 digits)
_TERM = re.compile(r"[a-z0-9]+")
_CAP = re.compile(r"\b(?:under|below|less than|no more than|max|budget|up to)\s+\$?\s*(\d+(?:\.\d+)?)")
_STOP = frozenset("a an and any the for of to in on with w o i me my need want looking ideas pls please "
                  "something recommendations that is it one".split())


def _number(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return 0.0
    return x if math.isfinite(x) else 0.0


def item_id_of(candidate: Mapping[str, Any]) -> str:
    return str(candidate.get("item_id", candidate.get("id", "")))


def leaf_category(candidate: Mapping[str, Any]) -> str:
    """The leaf category: ``category`` (as Milvus holds it) or the last step of ``category_path``
    (a list, or a string "A > B")."""
    if candidate.get("category"):
        return str(candidate["category"])
    path = candidate.get("category_path") or []
    if isinstance(path, str):
        path = [p.strip() for p in path.split(">") if p.strip()]
    return str(path[-1]) if path else ""


def terms(text: str) -> frozenset[str]:
    """Lower-case word terms with a plural "s" stripped (no stemmer: this runs per candidate)."""
    out = set()
    for t in _TERM.findall(text.lower()):
        out.add(t[:-1] if len(t) > 3 and t.endswith("s") and not t.endswith("ss") else t)
    return frozenset(out)


def attribute_values(candidate: Mapping[str, Any]) -> list[str]:
    attrs = candidate.get("attributes") or {}
    return [str(v) for v in attrs.values()] if isinstance(attrs, Mapping) else []


@functools.lru_cache(maxsize=200_000)
def _item_terms(title: str, leaf: str, brand: str, values: tuple[str, ...]) -> tuple[frozenset, frozenset, frozenset]:
    """(leaf terms, brand terms, all the product's terms), cached by content: a search's
    candidates are mostly products seen before, and this runs for each of them."""
    leaf_terms, brand_terms = terms(leaf), terms(brand)
    return leaf_terms, brand_terms, terms(title) | leaf_terms | brand_terms | terms(" ".join(values))


@dataclass
class QueryView:
    """A query digested once per search: its content terms, which of them are attribute values
    somewhere in the catalog (what the shopper asks for), and the price cap it states."""

    terms: frozenset[str]
    asked: frozenset[str]
    cap: float | None


def query_view(query: str, catalog: Catalog) -> QueryView:
    found = _CAP.search(query.lower())
    cap = float(found.group(1)) if found else None
    words = terms(_CAP.sub(" ", query.lower())) - _STOP
    return QueryView(words, words & catalog.value_terms, cap if cap and cap > 0 else None)


def query_item_features(query: QueryView, candidate: Mapping[str, Any], catalog: Catalog) -> list[float]:
    """How the product answers the query's words, asked-for values and price cap (see the module
    docstring); 0 for what the query does not say."""
    return _query_item(query, candidate, item_id_of(candidate), leaf_category(candidate),
                       _number(candidate.get("price")), catalog)


def _query_item(query: QueryView, candidate: Mapping[str, Any], item_id: str, leaf_name: str, price: float,
                catalog: Catalog) -> list[float]:
    values = attribute_values(candidate) or catalog.values.get(item_id, [])
    leaf, brand, item_terms = _item_terms(str(candidate.get("title") or ""), leaf_name,
                                          str(candidate.get("brand") or ""), tuple(values))
    q = query.terms
    share = len(q & item_terms) / len(q) if q else 0.0
    matched = len(query.asked & item_terms) / len(query.asked) if query.asked else 0.0
    missing = float(bool(query.asked - item_terms))
    cap = query.cap
    over = ratio = 0.0
    if cap is not None and price > 0:
        over = float(price > cap)
        ratio = max(-PRICE_RATIO_CLIP, min(PRICE_RATIO_CLIP, math.log(price / cap)))
    return [share, float(bool(leaf) and leaf <= q), float(bool(brand) and brand <= q), matched, missing,
            float(cap is not None), over, ratio]


def item_features(candidate: Mapping[str, Any]) -> list[float]:
    """The item's behaviour stats as the Feast ``item_stats`` view holds them (missing -> 0);
    the purchase count is log1p'd."""
    return [_number(candidate.get("ctr_24h")), _number(candidate.get("cvr_24h")),
            math.log1p(max(0.0, _number(candidate.get("purchases_24h")))), _number(candidate.get("cart_rate_7d")),
            _number(candidate.get("cvr_7d"))]


class Catalog:
    """What the ranker knows of products beyond a candidate's own fields: price, brand and leaf
    category per item id (a user context names its recent items by id only), and each leaf
    category's price quantiles, so a price can be read as a level within its category (0 = the
    category's cheapest, 1 = its dearest) and compared across categories. Filled from the
    training catalog and then from every candidate scored."""

    def __init__(self, quantiles: Mapping[str, Sequence[float]] | None = None):
        self.quantiles = {c: [float(x) for x in q] for c, q in (quantiles or {}).items()}  # log-price quantiles
        self.items: dict[str, tuple[float, str, str]] = {}  # item id -> (price, brand, leaf category)
        self.values: dict[str, list[str]] = {}  # item id -> attribute values (search hits carry none)
        self.value_terms: frozenset[str] = frozenset()  # every attribute value's terms in the catalog

    @classmethod
    def from_items(cls, items: Sequence[Mapping[str, Any]]) -> Catalog:
        by_leaf: dict[str, list[float]] = {}
        for it in items:
            if _number(it.get("price")) > 0:
                by_leaf.setdefault(leaf_category(it), []).append(math.log(_number(it.get("price"))))
        cat = cls({c: np.quantile(v, np.linspace(0, 1, PRICE_QUANTILES)).tolist()
                   for c, v in sorted(by_leaf.items()) if len(v) >= 5})
        for it in items:
            cat.add(it)
            if attribute_values(it):
                cat.values[item_id_of(it)] = attribute_values(it)
        cat.value_terms = terms(" ".join(v for vs in cat.values.values() for v in vs)) - _STOP
        return cat

    def add(self, candidate: Mapping[str, Any]) -> None:
        self.items[item_id_of(candidate)] = (_number(candidate.get("price")), str(candidate.get("brand") or ""),
                                             leaf_category(candidate))

    def price_level(self, leaf: str, price: float) -> float | None:
        """Piecewise-linear position of the log price among the category's quantiles, in 0..1
        (plain Python: it runs for every candidate of every search). A price that several
        quantiles share (a common price such as 24.99) sits in the middle of them, whatever
        its last bits: a price read back as float32 (Milvus) must get the level the training
        rows' float64 price got, not one a run of quantiles away."""
        q = self.quantiles.get(leaf)
        if q is None or price <= 0:
            return None
        x = math.log(price)
        lo, hi = bisect.bisect_left(q, x - PRICE_TIE), bisect.bisect_right(q, x + PRICE_TIE)
        if hi > lo:  # x is (within PRICE_TIE of) the quantiles lo..hi-1
            return (lo + hi - 1) / 2 / (len(q) - 1)
        if x <= q[0]:
            return 0.0
        if x >= q[-1]:
            return 1.0
        k = lo - 1  # q[k] < x < q[k + 1]
        return (k + (x - q[k]) / (q[k + 1] - q[k])) / (len(q) - 1)

    def to_json(self) -> dict[str, Any]:
        return {"price_quantiles": self.quantiles,  # exact: serving's price levels are training's
                "items": {i: list(v) for i, v in self.items.items()}, "values": self.values,
                "value_terms": sorted(self.value_terms)}

    @classmethod
    def from_json(cls, saved: Mapping[str, Any]) -> Catalog:
        cat = cls(saved["price_quantiles"])
        cat.items = {i: (float(p), str(b), str(c)) for i, (p, b, c) in saved["items"].items()}
        cat.values = {i: [str(v) for v in vs] for i, vs in saved.get("values", {}).items()}
        cat.value_terms = frozenset(saved.get("value_terms", ()))
        return cat


@dataclass
class UserView:
    """A Feast ``user_context`` row digested once per search for the per-candidate features."""

    affinity: dict[str, float]  # category -> weight (sums to 1 as the stream worker writes it)
    level: dict[str, int]  # recent item -> strongest engagement (1 click, 2 cart, 3 purchase)
    median_price: float  # of the recent items with a known price, 0 if none
    median_price_level: float | None  # of the recent items' price levels in their categories
    brand_share: dict[str, float]  # brand -> share of the recent items with a known brand


def user_view(context: Mapping[str, Any] | None, catalog: Catalog) -> UserView | None:
    """None without a user. Recent items the catalog does not know add no price or brand."""
    if not context:
        return None
    level: dict[str, int] = {}
    ids = [str(i) for i in (context.get("recent_item_ids") or [])]
    actions = list(context.get("recent_actions") or [])
    for item_id, action in zip(ids, actions):
        level[item_id] = max(level.get(item_id, 0), ENGAGEMENT.get(str(action), 0))
    known = [catalog.items[i] for i in dict.fromkeys(ids) if i in catalog.items]
    prices = [price for price, _, _ in known if price > 0]
    levels = [x for x in (catalog.price_level(leaf, price) for price, _, leaf in known) if x is not None]
    brands = [brand for _, brand, _ in known if brand]
    return UserView(category_affinity(context), level, statistics.median(prices) if prices else 0.0,
                    statistics.median(levels) if levels else None,
                    {b: brands.count(b) / len(brands) for b in set(brands)})


def user_item_features(candidate: Mapping[str, Any], view: UserView | None, catalog: Catalog) -> list[float]:
    """How this shopper relates to this item: affinity to its leaf category, whether they recently
    clicked / carted / bought it, its price against their recent items' (log ratio to the median
    price, and the gap between price levels within categories), and the share of their recent
    items of its brand. All 0 without a user; a feature without the data for it is 0."""
    return _user_item(candidate, item_id_of(candidate), leaf_category(candidate), _number(candidate.get("price")),
                      view, catalog)


def _user_item(candidate: Mapping[str, Any], item_id: str, leaf: str, price: float, view: UserView | None,
               catalog: Catalog) -> list[float]:
    if view is None:
        return [0.0] * len(USER_FEATURES)
    level = view.level.get(item_id, 0)
    ratio = 0.0
    if price > 0 and view.median_price > 0:
        ratio = max(-PRICE_RATIO_CLIP, min(PRICE_RATIO_CLIP, math.log(price / view.median_price)))
    item_level = catalog.price_level(leaf, price)
    gap = 0.0 if item_level is None or view.median_price_level is None else item_level - view.median_price_level
    return [1.0, view.affinity.get(leaf, 0.0), float(level >= 1), float(level >= 2), float(level >= 3), ratio,
            gap, abs(gap), view.brand_share.get(str(candidate.get("brand") or ""), 0.0)]


def features(query: QueryView, candidate: Mapping[str, Any], view: UserView | None, catalog: Catalog) -> list[float]:
    """The model's dense input for one candidate: ``FEATURES``, in that order (the id, leaf
    category and price read once: this runs for every candidate of every search)."""
    item_id, leaf, price = item_id_of(candidate), leaf_category(candidate), _number(candidate.get("price"))
    return (_query_item(query, candidate, item_id, leaf, price, catalog) + item_features(candidate)
            + _user_item(candidate, item_id, leaf, price, view, catalog))
