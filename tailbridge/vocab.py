"""The words every part of tailbridge shares: how a query is keyed, which text an item is
encoded from, the feedback label ladder and the priors of the smoothed behaviour rates.

It imports nothing of the project, so the stream processors, the trainers and the query
handler can all depend on it without depending on each other.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

_SPACES = re.compile(r"\s+")


def normalize_query(text: str) -> str:
    """The key a query is counted and looked up by: NFKC, lower case, single spaces."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def item_text(item: Mapping[str, Any]) -> str:
    """The text an item is encoded from: title first (it may be all there is), then brand,
    the leaf categories and the description."""
    parts = [item["title"], item.get("brand") or "", " > ".join(item.get("category_path") or ()),
             item.get("description") or ""]
    return ". ".join(part for part in parts if part)


# The feedback label of a served item, ascending: what the shopper did with it at most.
LABELS = ("shown_unclicked", "clicked", "added_to_cart", "purchased")
LABEL_OF_ACTION = {"click": "clicked", "add_to_cart": "added_to_cart", "purchase": "purchased"}
# Training levels: 0 is a random catalog item never shown (method 5's lowest level).
LABEL_LEVEL = {label: level for level, label in enumerate(LABELS, start=1)}
# How far past being shown an engagement went (clicked 1, carted 2, purchased 3), by label or
# by action name. An engagement counts for its own level and every level below it.
ENGAGEMENT = ({label: LABEL_LEVEL[label] - 1 for label in LABELS[1:]}
              | {action: LABEL_LEVEL[label] - 1 for action, label in LABEL_OF_ACTION.items()})

# Behaviour rates are smoothed towards these priors (rate, pseudo-count), online by the stream
# worker and offline when training rebuilds the stats a search saw.
PRIOR_CTR, PRIOR_CTR_WEIGHT = 0.05, 20.0
PRIOR_CVR, PRIOR_CVR_WEIGHT = 0.05, 10.0  # purchases per click
PRIOR_CART, PRIOR_CART_WEIGHT = 0.15, 10.0  # carts per click
# An item's conversion after the click (carts and purchases per click) is counted over a week:
# an item gets a few clicks a day, and what it converts at changes slowly (reviews, returns).
CONVERSION_WINDOW_DAYS = 7
# The Feast ``item_stats`` fields search reads for its candidates and the ranker's item
# features are computed from (``streams.item_stats`` writes them, ``models.ranking`` reads them).
ITEM_STATS_FIELDS = ("ctr_24h", "cvr_24h", "purchases_24h", "cart_rate_7d", "cvr_7d")
# An item nobody engaged with (no row, or its row expired): the smoothed rates' priors, in
# ``ITEM_STATS_FIELDS`` order.
NO_ITEM_STATS = {"ctr_24h": PRIOR_CTR, "cvr_24h": PRIOR_CVR, "purchases_24h": 0.0, "cart_rate_7d": PRIOR_CART,
                 "cvr_7d": PRIOR_CVR}


def smoothed(count: float, base: float, prior: float, weight: float) -> float:
    """``count / base`` pulled towards ``prior`` by ``weight`` pseudo-observations of the base."""
    return (count + prior * weight) / (base + weight)
