"""Per-item behaviour over sliding windows, from bucketed counters.

Counters live in one Redis hash per item, one field per (action, bucket): minute buckets for
the 1 h window, hour buckets for the 24 h window, day buckets for the 7 d window (the
conversion rates per click: an item gets too few clicks in a day to tell its cart rate). Any
worker can increment them (items are not partitioned; users are), and the windowed sums are
computed when the item's features are written. Rates are smoothed towards a prior so a new
item with 1 impression and 1 click does not get a CTR of 100%.
"""

from __future__ import annotations

from collections.abc import Mapping

from tailbridge.vocab import (CONVERSION_WINDOW_DAYS, ITEM_STATS_FIELDS, PRIOR_CART, PRIOR_CART_WEIGHT, PRIOR_CTR,
                              PRIOR_CTR_WEIGHT, PRIOR_CVR, PRIOR_CVR_WEIGHT, smoothed)

ACTIONS = {"impression": "impressions", "click": "clicks", "add_to_cart": "carts", "purchase": "purchases"}
# window -> (bucket width ms, buckets)
WINDOWS = {"1h": (60_000, 60), "24h": (3_600_000, 24), "7d": (86_400_000, CONVERSION_WINDOW_DAYS)}
COUNTER_TTL_S = (CONVERSION_WINDOW_DAYS + 1) * 86_400  # a little longer than the longest window
LAST_EVENT_FIELD = "last_ms"
# What search reads of an item's Feast row for the ranker (models.ranking.features.ITEM_FEATURES).
STATS_FIELDS = ITEM_STATS_FIELDS


def bucket_fields(action: str, event_ms: int) -> list[str]:
    """The hash fields one event increments: one bucket per window."""
    return [f"{ACTIONS[action]}:{window}:{event_ms // width}" for window, (width, _) in WINDOWS.items()]


def window_counts(counters: Mapping[str, int | str], now_ms: int) -> dict[str, int]:
    """Sum the buckets that fall inside each window ending at ``now_ms``."""
    totals = {f"{name}_{window}": 0 for window in WINDOWS for name in ACTIONS.values()}
    for field, count in counters.items():
        if field == LAST_EVENT_FIELD:
            continue
        name, window, bucket = field.split(":")
        width, buckets = WINDOWS[window]
        if now_ms // width - buckets < int(bucket) <= now_ms // width:
            totals[f"{name}_{window}"] += int(count)
    return totals


def stale_fields(counters: Mapping[str, int | str], now_ms: int) -> list[str]:
    """Buckets that fell out of their window and can be deleted."""
    stale = []
    for field in counters:
        if field == LAST_EVENT_FIELD:
            continue
        _, window, bucket = field.split(":")
        width, buckets = WINDOWS[window]
        if int(bucket) <= now_ms // width - buckets:
            stale.append(field)
    return stale


def feature_row(item_id: str, counters: Mapping[str, int | str]) -> dict:
    """The Feast `item_stats` row, windows ending at the item's latest event."""
    now_ms = int(counters.get(LAST_EVENT_FIELD, 0))
    row = {"item_id": item_id, **window_counts(counters, now_ms)}
    row["ctr_24h"] = smoothed(row["clicks_24h"], row["impressions_24h"], PRIOR_CTR, PRIOR_CTR_WEIGHT)
    row["cvr_24h"] = smoothed(row["purchases_24h"], row["clicks_24h"], PRIOR_CVR, PRIOR_CVR_WEIGHT)
    row["cart_rate_7d"] = smoothed(row["carts_7d"], row["clicks_7d"], PRIOR_CART, PRIOR_CART_WEIGHT)
    row["cvr_7d"] = smoothed(row["purchases_7d"], row["clicks_7d"], PRIOR_CVR, PRIOR_CVR_WEIGHT)
    return row

