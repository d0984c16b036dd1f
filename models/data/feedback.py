"""The feedback log as the retriever reads it, and user contexts rebuilt from it.

The stream workers write the log (``streams/feedback.py``): one row per item served for a
query, labelled with the best thing the shopper then did, as parquet partitioned by date:

    <feedback dir>/examples/date=YYYY-MM-DD/*.parquet

The retriever needs these columns (``FEEDBACK_COLUMNS``; others are ignored):

    query_id    string   the served search (one page)
    query       string   its text
    user_id     string
    session_id  string
    item_id     string   the served item
    position    int      1-based rank on the page
    label       string   shown_unclicked | clicked | added_to_cart | purchased
    event_time  timestamp (UTC) of the search

Rows are deduplicated by (query_id, item_id): the writer is at-least-once. Training uses the
log for behaviour levels (the multi-grained loss), for graph edges, and for the user context a
shopper had when searching (their earlier clicks, carts and purchases, newest first, and
category affinities) -- the same fields as the Feast ``user_context`` view.

For demo data, ``tailbridge.synthetic.feedback`` simulates such a log from shopper sessions over
the training queries only, so that no test judgement reaches training or a user context.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from tailbridge.vocab import LABEL_LEVEL

FEEDBACK_COLUMNS = {"query_id": "string", "query": "string", "user_id": "string", "session_id": "string",
                    "item_id": "string", "position": "int", "label": "string", "event_time": "timestamp"}
LABEL_ACTION = {"clicked": "click", "added_to_cart": "add_to_cart", "purchased": "purchase"}
ACTION_LABEL = {action: label for label, action in LABEL_ACTION.items()}
ACTION_WEIGHT = {"click": 1.0, "add_to_cart": 3.0, "purchase": 5.0}  # as the stream worker weighs affinity
RECENT_ITEMS = 50


class FeedbackError(ValueError):
    pass


def read_feedback(feedback_dir: Path) -> pd.DataFrame:
    """All example rows under ``feedback_dir/examples``, deduplicated, sorted by time."""
    import pyarrow.parquet as pq

    files = sorted((Path(feedback_dir) / "examples").glob("date=*/*.parquet"))
    if not files:
        raise FeedbackError(f"{feedback_dir}: no feedback files (expected examples/date=YYYY-MM-DD/*.parquet)")
    frames = []
    for path in files:
        table = pq.read_table(path)
        missing = [c for c in FEEDBACK_COLUMNS if c not in table.column_names]
        if missing:
            raise FeedbackError(f"{path}: missing feedback columns {', '.join(missing)}")
        frames.append(table.select(list(FEEDBACK_COLUMNS)).to_pandas())
    frame = pd.concat(frames, ignore_index=True)
    bad = sorted(set(frame["label"]) - set(LABEL_LEVEL))
    if bad:
        raise FeedbackError(f"{feedback_dir}: unknown labels {bad} (expected {', '.join(LABEL_LEVEL)})")
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    frame = frame.drop_duplicates(subset=["query_id", "item_id"], keep="last")
    return frame.sort_values(["event_time", "query_id", "position"], ignore_index=True)


def write_feedback(frame: pd.DataFrame, feedback_dir: Path) -> list[Path]:
    """Write rows in the log's layout (one file per date)."""
    written = []
    for date, part in frame.groupby(frame["event_time"].dt.strftime("%Y-%m-%d")):
        directory = Path(feedback_dir) / "examples" / f"date={date}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "part-simulated.parquet"
        part.to_parquet(path, index=False)
        written.append(path)
    return written


def searches_with_context(frame: pd.DataFrame, item_category: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per logged search (query_id): its query, user, the items with their labels, and the user's
    context just before it (built only from that user's earlier engagements). ``frame`` is in
    ``read_feedback`` order, so the rows of one search are contiguous and searches are in time order."""
    out: dict[str, dict[str, Any]] = {}
    history: dict[str, list[tuple[str, str]]] = {}  # user -> [(item, action)] newest first
    affinity: dict[str, dict[str, float]] = {}
    columns = [frame[c].astype(str).tolist() for c in ("query_id", "query", "user_id", "item_id", "label")]
    rows = list(zip(*columns))
    start = 0
    while start < len(rows):
        end = start
        while end < len(rows) and rows[end][0] == rows[start][0]:
            end += 1
        qid, query, user = rows[start][:3]
        past, aff = history.get(user, []), affinity.get(user, {})
        total = sum(aff.values()) or 1.0
        out[qid] = {
            "query": query, "user_id": user, "items": {r[3]: r[4] for r in rows[start:end]},
            "context": {"recent_item_ids": [i for i, _ in past], "recent_actions": [a for _, a in past],
                        "category_affinity": {c: v / total for c, v in aff.items()}} if past else None,
        }
        for _, _, _, item_id, label in rows[start:end]:  # in page order
            if label == "shown_unclicked":
                continue
            action = LABEL_ACTION[label]
            history[user] = [(item_id, action), *history.get(user, [])][:RECENT_ITEMS]
            category = item_category.get(item_id)
            if category:
                user_aff = affinity.setdefault(user, {})
                user_aff[category] = user_aff.get(category, 0.0) + ACTION_WEIGHT[action]
        start = end
    return out


def context_at(frame: pd.DataFrame, user_id: str, item_category: Mapping[str, str],
               before: pd.Timestamp | None = None) -> dict[str, Any] | None:
    """The user's context from their engagements in ``frame`` (strictly before ``before`` if
    given): what Feast's ``user_context`` would hold at that moment. None if there are none."""
    rows = frame[(frame["user_id"] == user_id) & (frame["label"] != "shown_unclicked")]
    if before is not None:
        rows = rows[rows["event_time"] < before]
    if rows.empty:
        return None
    rows = rows.sort_values(["event_time", "query_id", "position"])
    engaged = list(zip(rows["item_id"].astype(str), rows["label"].map(LABEL_ACTION)))
    affinity: dict[str, float] = {}
    for item_id, action in engaged:
        category = item_category.get(item_id)
        if category:
            affinity[category] = affinity.get(category, 0.0) + ACTION_WEIGHT[action]
    total = sum(affinity.values()) or 1.0
    recent = engaged[::-1][:RECENT_ITEMS]
    return {"recent_item_ids": [i for i, _ in recent], "recent_actions": [a for _, a in recent],
            "category_affinity": {c: v / total for c, v in affinity.items()}}
