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

An optional ``source`` column (the route that served the item: dense, bm25, rewrite:...; the
stream worker writes it) is kept when present, else read as "".

Rows are deduplicated by (query_id, item_id): the writer is at-least-once. Training uses the
log for behaviour levels (the multi-grained loss), for graph edges, and for the user context a
shopper had when searching: the Feast ``user_context`` row, rebuilt by folding their earlier
logged searches with the stream worker's own fold (``models.data.user_context``, which says
where the log cannot give exactly what the worker wrote).

For demo data, ``tailbridge.synthetic.feedback`` simulates such a log from shopper sessions over
the training queries only, so that no test judgement reaches training or a user context.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from tailbridge.models.data import user_context as uc
from tailbridge.vocab import LABEL_LEVEL

FEEDBACK_COLUMNS = {"query_id": "string", "query": "string", "user_id": "string", "session_id": "string",
                    "item_id": "string", "position": "int", "label": "string", "event_time": "timestamp"}
LABEL_ACTION = {"clicked": "click", "added_to_cart": "add_to_cart", "purchased": "purchase"}
ACTION_LABEL = {action: label for label, action in LABEL_ACTION.items()}


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
        frame = table.select([c for c in (*FEEDBACK_COLUMNS, "source") if c in table.column_names]).to_pandas()
        frames.append(frame if "source" in frame else frame.assign(source=""))
    frame = pd.concat(frames, ignore_index=True)
    bad = sorted(set(frame["label"]) - set(LABEL_LEVEL))
    if bad:
        raise FeedbackError(f"{feedback_dir}: unknown labels {bad} (expected {', '.join(LABEL_LEVEL)})")
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    frame["source"] = frame["source"].fillna("").astype(str)
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
    context just before it: the Feast ``user_context`` row the stream worker's fold
    (``models.data.user_context``) gives for the user's earlier logged searches, as the models
    take it (None when it has nothing to personalise on). ``frame`` is in ``read_feedback`` order."""
    out: dict[str, dict[str, Any]] = {}
    states: dict[str, uc.UserState] = {}
    for search in uc.logged_searches(frame):
        state = states.setdefault(search.user_id, uc.new_state())
        out[search.query_id] = {
            "query": search.query, "user_id": search.user_id, "items": dict(search.items),
            "context": uc.as_context(uc.feature_row(search.user_id, state)),
        }
        uc.fold_search(state, search, item_category)
    return out


def context_at(frame: pd.DataFrame, user_id: str, item_category: Mapping[str, str],
               before: pd.Timestamp | None = None) -> dict[str, Any] | None:
    """The user's context from their searches in ``frame`` (strictly before ``before`` if
    given), folded as the stream worker folds them: what Feast's ``user_context`` would hold at
    that moment, as the models take it. None if it has nothing to personalise on."""
    rows = frame[frame["user_id"] == user_id]
    if before is not None:
        rows = rows[rows["event_time"] < before]
    if rows.empty:
        return None
    rows = rows.sort_values(["event_time", "query_id", "position"])
    state = uc.fold_log(uc.logged_searches(rows), item_category).get(str(user_id), uc.new_state())
    return uc.as_context(uc.feature_row(str(user_id), state))
