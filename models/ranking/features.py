"""What a candidate and the shopper's context contribute to the ranker besides text.

* Item behaviour (``ITEM_FEATURES``): ``ctr_24h``, ``cvr_24h``, ``log1p(purchases_24h)``, exactly
  the stats serving reads for its candidates from the Feast ``item_stats`` view (the smoothing
  priors for an item without a row).
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
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tailbridge.models.retrieval.model import category_affinity
from tailbridge.vocab import ENGAGEMENT

ITEM_FEATURES = ("ctr_24h", "cvr_24h", "log1p_purchases_24h")
USER_FEATURES = ("has_user", "category_affinity", "recently_clicked", "recently_carted", "recently_purchased",
                 "log_price_vs_recent_median", "price_level_vs_recent", "abs_price_level_vs_recent", "brand_share")
FEATURES = ITEM_FEATURES + USER_FEATURES
PRICE_RATIO_CLIP = 3.0
PRICE_QUANTILES = 21


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


def item_features(candidate: Mapping[str, Any]) -> list[float]:
    """The item's behaviour stats as the Feast ``item_stats`` view holds them (missing -> 0);
    the purchase count is log1p'd."""
    return [_number(candidate.get("ctr_24h")), _number(candidate.get("cvr_24h")),
            math.log1p(max(0.0, _number(candidate.get("purchases_24h"))))]


class Catalog:
    """What the ranker knows of products beyond a candidate's own fields: price, brand and leaf
    category per item id (a user context names its recent items by id only), and each leaf
    category's price quantiles, so a price can be read as a level within its category (0 = the
    category's cheapest, 1 = its dearest) and compared across categories. Filled from the
    training catalog and then from every candidate scored."""

    def __init__(self, quantiles: Mapping[str, Sequence[float]] | None = None):
        self.quantiles = {c: [float(x) for x in q] for c, q in (quantiles or {}).items()}  # log-price quantiles
        self.items: dict[str, tuple[float, str, str]] = {}  # item id -> (price, brand, leaf category)

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
        return cat

    def add(self, candidate: Mapping[str, Any]) -> None:
        self.items[item_id_of(candidate)] = (_number(candidate.get("price")), str(candidate.get("brand") or ""),
                                             leaf_category(candidate))

    def price_level(self, leaf: str, price: float) -> float | None:
        """Piecewise-linear position of the log price among the category's quantiles, in 0..1
        (plain Python: it runs for every candidate of every search)."""
        q = self.quantiles.get(leaf)
        if q is None or price <= 0:
            return None
        x = math.log(price)
        if x <= q[0]:
            return 0.0
        if x >= q[-1]:
            return 1.0
        k = bisect.bisect_right(q, x) - 1  # q[k] <= x < q[k + 1], so the span is > 0
        return (k + (x - q[k]) / (q[k + 1] - q[k])) / (len(q) - 1)

    def to_json(self) -> dict[str, list[float]]:
        return {c: [round(x, 6) for x in q] for c, q in self.quantiles.items()}


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
    if view is None:
        return [0.0] * len(USER_FEATURES)
    level = view.level.get(item_id_of(candidate), 0)
    price, leaf = _number(candidate.get("price")), leaf_category(candidate)
    ratio = 0.0
    if price > 0 and view.median_price > 0:
        ratio = max(-PRICE_RATIO_CLIP, min(PRICE_RATIO_CLIP, math.log(price / view.median_price)))
    item_level = catalog.price_level(leaf, price)
    gap = 0.0 if item_level is None or view.median_price_level is None else item_level - view.median_price_level
    return [1.0, view.affinity.get(leaf, 0.0), float(level >= 1), float(level >= 2), float(level >= 3), ratio,
            gap, abs(gap), view.brand_share.get(str(candidate.get("brand") or ""), 0.0)]


def features(candidate: Mapping[str, Any], view: UserView | None, catalog: Catalog) -> list[float]:
    """The model's dense input for one candidate: ``FEATURES``, in that order."""
    return item_features(candidate) + user_item_features(candidate, view, catalog)
