"""A feedback log for demo data, simulated offline: the labelled rows the stream worker would
have written (``models.data.feedback`` describes the log and reads it) had the shopper
sessions of ``synthetic.shoppers`` been live traffic. Training uses it when demo data has no
logged behaviour yet (``tailbridge train ... --simulate-feedback N``).

Only the *training* queries are searched, so that no test judgement reaches training or a user
context. Deterministic for a seed: the clock is synthetic (one event per simulated second).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from tailbridge.models.data.feedback import ACTION_LABEL, FEEDBACK_COLUMNS
from tailbridge.streams.events import InteractionEvent, QueryEvent
from tailbridge.synthetic import catalog
from tailbridge.synthetic.shoppers import simulate
from tailbridge.vocab import LABEL_LEVEL


def simulate_feedback(data_dir: Path, sessions: int, seed: int = 7, start: datetime = datetime(2024, 1, 1, tzinfo=UTC),
                      shoppers: Callable[[catalog.SynthDataset], catalog.SynthDataset] | None = None) -> pd.DataFrame:
    """``sessions`` simulated shopper sessions over the training queries of the demo data in
    ``data_dir``, as feedback-log rows: one per served item, labelled with the best thing the
    shopper then did (``models.data.feedback.write_feedback`` writes them in the log's layout).
    ``start``: the first event's time (a later stretch of log starts after an earlier one);
    ``shoppers``: changes the dataset's shoppers first (``synthetic.drift.shifted_tastes``)."""
    dataset = catalog.load(Path(data_dir))
    if shoppers is not None:
        dataset = shoppers(dataset)
    # The simulator only issues queries that have judgements: keep the training ones.
    dataset.qrels = {q: j for q, j in dataset.qrels.items() if dataset.split.get(q) == "train"}
    tick = iter(range(1 << 62))
    clock = lambda: start + timedelta(seconds=next(tick))  # noqa: E731 - one event per simulated second
    served: dict[str, dict[str, Any]] = {}
    best: dict[tuple[str, str], int] = {}
    for event in simulate(dataset, seed=seed, sessions=sessions, clock=clock):
        if isinstance(event, QueryEvent):
            served[event.query_id] = {"event": event}
        elif isinstance(event, InteractionEvent) and event.query_id in served and event.action != "impression":
            label = ACTION_LABEL[event.action]
            key = (event.query_id, event.item_id)
            best[key] = max(best.get(key, 0), LABEL_LEVEL[label])
    level_label = {v: k for k, v in LABEL_LEVEL.items()}
    rows = []
    for qid, entry in served.items():
        q = entry["event"]
        for s in q.served:
            rows.append({"query_id": qid, "query": q.query, "user_id": q.user_id, "session_id": q.session_id,
                         "item_id": s.item_id, "position": s.position,
                         "label": level_label[best.get((qid, s.item_id), LABEL_LEVEL["shown_unclicked"])],
                         "event_time": q.event_time})
    frame = pd.DataFrame(rows, columns=list(FEEDBACK_COLUMNS))
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    return frame
