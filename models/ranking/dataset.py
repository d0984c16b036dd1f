"""The ranker's rows: the feedback log joined to the catalog, with point-in-time features and a
time split, for training (``models.ranking.training``) and evaluation (``models.ranking.evaluation``).

1. Data: the feedback log (``models.data.feedback``: one row per served item, labelled
   shown_unclicked < clicked < added_to_cart < purchased) and the catalog of the data dir.
   Rows whose item is not in the catalog are dropped.
2. Split by time: the log's searches in time order; the last ``test_fraction`` (20%) are the
   test split, and no test search is trained on. The artifact records the last training
   search, and evaluation tests on every logged search after it (a log that grew since
   training adds test searches, never training ones).
3. Point-in-time features, so nothing a row's own labels say reaches its features:
   * item behaviour: ``ctr_24h``, ``cvr_24h``, ``purchases_24h`` and the conversion per click
     ``cart_rate_7d``, ``cvr_7d`` as the stream worker computes them (``streams.item_stats``:
     same smoothing priors), over the log's searches in the 24 h (7 days) before the row's
     search -- strictly earlier ones, so never the row's own search;
   * user context: the shopper's engagements before the search
     (``models.data.feedback.searches_with_context``, what the Feast ``user_context`` view
     held then).
   A log search's engagements are counted from the search's time; on real traffic a click
   that came after a later search started is a few seconds early (the simulator's sessions
   never overlap like that).
   Query x item features read the search's query text (``features.query_view``).
4. Training-only inputs: each row's logged position and route (the log's ``source``), which the
   examination factor of ``models.ranking.model`` reads while training; serving has neither.
5. Negatives never shown (training only, position 0, labelled nothing, with the stats of an
   item nobody engaged with): ``random_negatives`` random catalog items per training search
   (method 5's lowest level), and ``judged_negatives`` of the items judged a complement or
   irrelevant for the search's query, where the data has training judgements for it (the
   demo's training queries): logged pages are ~all relevant, so without them the ranker never
   learns what makes a candidate from another category or product type worse.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tailbridge.models.data.feedback import read_feedback, searches_with_context
from tailbridge.models.data.loaders import load_dataset
from tailbridge.models.ranking import features as ft
from tailbridge.vocab import (CONVERSION_WINDOW_DAYS, ITEM_STATS_FIELDS, LABEL_LEVEL, NO_ITEM_STATS, PRIOR_CART,
                              PRIOR_CART_WEIGHT, PRIOR_CTR, PRIOR_CTR_WEIGHT, PRIOR_CVR, PRIOR_CVR_WEIGHT, smoothed)


class RankerTrainingError(ValueError):
    pass


def _window_counts(times: np.ndarray, items: np.ndarray, levels: np.ndarray, window_ns: int) -> np.ndarray:
    """[rows, 4]: impressions, clicks, carts, purchases of each row's item in the log's rows of
    strictly earlier searches within ``window_ns`` before the row's (one impression per served
    row, a click for clicked-or-better, a cart for carted-or-better, a purchase for purchased)."""
    n = len(times)
    events: dict[str, deque] = {}  # item -> (time, counts) inside the window
    totals: dict[str, np.ndarray] = {}  # item -> [impressions, clicks, carts, purchases]
    out = np.zeros((n, 4), dtype=np.int64)
    start = 0
    while start < n:
        end = start
        while end < n and times[end] == times[start]:
            end += 1
        now = times[start]
        for r in range(start, end):  # rows at one instant see only earlier ones
            queue, total = events.get(items[r]), totals.get(items[r])
            while queue and queue[0][0] <= now - window_ns:
                total -= queue.popleft()[1]
            if total is not None:
                out[r] = total
        for r in range(start, end):
            counts = np.array([1, levels[r] >= LABEL_LEVEL["clicked"], levels[r] >= LABEL_LEVEL["added_to_cart"],
                               levels[r] == LABEL_LEVEL["purchased"]], dtype=np.int64)
            events.setdefault(items[r], deque()).append((times[r], counts))
            totals.setdefault(items[r], np.zeros(4, dtype=np.int64))
            totals[items[r]] += counts
        start = end
    return out


def point_in_time_stats(frame: pd.DataFrame, window_hours: float = 24.0,
                        conversion_days: float = CONVERSION_WINDOW_DAYS) -> np.ndarray:
    """[rows, len(ITEM_STATS_FIELDS)]: each row's item's stats as they stood just before the row's
    search, smoothed like the stream worker's ``item_stats``: ctr_24h, cvr_24h, purchases_24h over
    ``window_hours`` and cart_rate_7d, cvr_7d (per click) over ``conversion_days``, from the log's
    rows of strictly earlier searches. ``frame`` is in ``read_feedback`` (time) order."""
    times = ((frame["event_time"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ns")).to_numpy(np.int64)
    items = frame["item_id"].astype(str).to_numpy()
    levels = frame["label"].map(LABEL_LEVEL).to_numpy()
    day = _window_counts(times, items, levels, int(window_hours * 3600 * 1e9))
    week = _window_counts(times, items, levels, int(conversion_days * 86400 * 1e9))
    imps, clicks, _, purchases = day.T
    _, clicks_w, carts_w, purchases_w = week.T
    return np.stack([smoothed(clicks, imps, PRIOR_CTR, PRIOR_CTR_WEIGHT),
                     smoothed(purchases, clicks, PRIOR_CVR, PRIOR_CVR_WEIGHT), purchases,
                     smoothed(carts_w, clicks_w, PRIOR_CART, PRIOR_CART_WEIGHT),
                     smoothed(purchases_w, clicks_w, PRIOR_CVR, PRIOR_CVR_WEIGHT)], axis=1).astype(np.float32)


def candidate(item: Mapping[str, Any], stats: Sequence[float]) -> dict[str, Any]:
    """A catalog item shaped like a search hit: its fields plus the behaviour stats
    (``ITEM_STATS_FIELDS`` order)."""
    return {**item, **{name: float(x) for name, x in zip(ITEM_STATS_FIELDS, stats)}}


@dataclass
class RankerData:
    name: str
    items: dict[str, dict[str, Any]]  # the catalog
    item_ids: list[str]  # encoding order of the catalog
    query_texts: list[str]  # distinct query texts of the log
    search_ids: list[str]  # logged searches in time order
    search_times: list[pd.Timestamp]
    contexts: list[dict[str, Any] | None]  # per search: the user's context just before it
    user_ids: list[str]  # per search: the shopper ("" when the log has none)
    search_start: np.ndarray  # [searches + 1]: rows of search s are search_start[s]:search_start[s + 1]
    query: np.ndarray  # per row: index into query_texts
    item: np.ndarray  # per row: index into item_ids
    position: np.ndarray  # per row: 1-based rank on the served page
    route: np.ndarray  # per row: index into routes (0: unknown)
    routes: tuple[str, ...]  # the log's named serving routes
    level: np.ndarray  # per row: LABEL_LEVEL
    stats: np.ndarray  # per row: ITEM_STATS_FIELDS at the search
    features: np.ndarray  # per row: models.ranking.features.FEATURES
    train_searches: int  # searches [0, train_searches) train, the rest test
    # Negatives of training searches (not rows of any page): query, item, features.
    random_query: np.ndarray
    random_item: np.ndarray
    random_features: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.level)

    def split_rows(self, split: str) -> np.ndarray:
        cut = self.search_start[self.train_searches]
        return np.arange(cut) if split == "train" else np.arange(cut, self.rows)

    def candidates(self, s: int) -> list[dict[str, Any]]:
        rows = range(self.search_start[s], self.search_start[s + 1])
        return [candidate(self.items[self.item_ids[self.item[r]]], self.stats[r]) for r in rows]


def prepare(data_dir: Path, feedback_dir: Path, test_fraction: float = 0.2, window_hours: float = 24.0,
            test_after: tuple[str, str] | None = None, say: Callable[[str], None] = print,
            random_negatives: int = 0, judged_negatives: int = 0, seed: int = 7) -> RankerData:
    """Rows, features and the split. ``test_after`` = (ISO time, search id) of the last training
    search: the test split is every search after it (evaluation of a trained version)."""
    data = load_dataset(data_dir)
    frame = read_feedback(feedback_dir)
    dropped = int((~frame["item_id"].isin(data.items.keys())).sum())
    frame = frame[frame["item_id"].isin(data.items.keys())].reset_index(drop=True)
    if frame.empty:
        raise RankerTrainingError(f"{feedback_dir}: no logged row names an item of the catalog in {data_dir}")
    if dropped:
        say(f"feedback: dropped {dropped} rows whose item is not in the catalog")
    categories = {i: ft.leaf_category(it) for i, it in data.items.items()}
    catalog = ft.Catalog.from_items([data.items[i] for i in sorted(data.items)])  # as the artifact ships it
    with_context = searches_with_context(frame, categories)  # insertion order = time order

    search_ids = list(with_context)
    first = frame.drop_duplicates("query_id")
    times = dict(zip(first["query_id"].astype(str), first["event_time"]))
    users = dict(zip(first["query_id"].astype(str), first["user_id"].fillna("").astype(str)))
    search_index = {s: k for k, s in enumerate(search_ids)}
    row_search = frame["query_id"].astype(str).map(search_index).to_numpy()
    search_start = np.searchsorted(row_search, np.arange(len(search_ids) + 1))
    item_ids = sorted(data.items)
    item_index = {i: k for k, i in enumerate(item_ids)}
    query_texts = sorted(set(frame["query"].astype(str)))
    query_index = {q: k for k, q in enumerate(query_texts)}

    stats = point_in_time_stats(frame, window_hours)
    contexts = [with_context[s]["context"] for s in search_ids]
    views = [ft.user_view(c, catalog) for c in contexts]
    asked = [ft.query_view(q, catalog) for q in query_texts]
    query_col = frame["query"].astype(str).map(query_index).to_numpy()
    items_col = frame["item_id"].astype(str).tolist()
    feats = np.array([ft.features(asked[q], candidate(data.items[i], st), views[s], catalog)
                      for q, i, st, s in zip(query_col, items_col, stats, row_search)], dtype=np.float32)
    routes = tuple(sorted(set(frame["source"]) - {""}))
    route_col = frame["source"].map({r: k + 1 for k, r in enumerate(routes)}).fillna(0).to_numpy(np.int64)

    if test_after is not None:
        after = (pd.Timestamp(test_after[0]), test_after[1])
        train_searches = sum(1 for s in search_ids if (times[s], s) <= after)
    else:
        train_searches = int(round(len(search_ids) * (1 - test_fraction)))
    rng = np.random.default_rng(seed)
    negative_search = list(np.repeat(np.arange(train_searches), random_negatives))
    negative_item = list(rng.integers(len(item_ids), size=len(negative_search)))
    if judged_negatives:
        text_qid = {text: qid for qid, text in data.queries.items()}
        judged = data.qrels.get("train", {})
        worse = {q: [item_index[i] for i, g in sorted(judged.get(text_qid.get(q, ""), {}).items())
                     if g <= 1 and i in item_index] for q in query_texts}
        for s in range(train_searches):
            pool = worse[query_texts[query_col[search_start[s]]]]
            for k in rng.choice(len(pool), size=min(judged_negatives, len(pool)), replace=False):
                negative_search.append(s)
                negative_item.append(pool[k])
    negative_search, negative_item = np.array(negative_search, int), np.array(negative_item, int)
    negative_query = query_col[search_start[negative_search]]
    unengaged = tuple(NO_ITEM_STATS.values())
    negative_feats = np.array([ft.features(asked[q], candidate(data.items[item_ids[i]], unengaged), views[s], catalog)
                               for q, s, i in zip(negative_query, negative_search, negative_item)], dtype=np.float32)
    return RankerData(
        random_query=negative_query, random_item=negative_item, routes=routes, route=route_col,
        random_features=negative_feats.reshape(len(negative_search), len(ft.FEATURES)),
        name=data.name, items=data.items, item_ids=item_ids, query_texts=query_texts, search_ids=search_ids,
        search_times=[times[s] for s in search_ids], contexts=contexts, search_start=search_start,
        user_ids=[users[s] for s in search_ids],
        query=query_col, item=np.array([item_index[i] for i in items_col]),
        position=frame["position"].to_numpy(), level=frame["label"].map(LABEL_LEVEL).to_numpy(), stats=stats,
        features=feats, train_searches=train_searches,
    )
