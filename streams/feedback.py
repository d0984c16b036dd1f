"""The feedback log: what was served for a query, joined with what the shopper then did.

While a query is open (for ``feedback_window_seconds`` of event time after it was served)
the worker keeps one Redis hash per query id: the served page under ``__query`` and one field
per ``<item_id>|<action>`` seen, holding the action's earliest event time (ms). When the
window closes the hash becomes labelled rows, one per served item (purchased > added_to_cart >
clicked > shown_unclicked; an action counts if it is no later than the search's time plus the
window), plus one row per rewrite used (its best outcome), appended as parquet files
partitioned by date:

    DATA_DIR/feedback/examples/date=YYYY-MM-DD/*.parquet
    DATA_DIR/feedback/rewrites/date=YYYY-MM-DD/*.parquet

Writing is at-least-once (a crash between writing a file and forgetting the query writes it
again), so readers dedup by (query_id, item_id) / (query_id, rewrite): ``read_examples`` does.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tailbridge.models.data.user_context import epoch_ms
from tailbridge.vocab import LABEL_OF_ACTION, LABELS

QUERY_FIELD = "__query"
REWRITE_SOURCE_PREFIX = "rewrite:"

EXAMPLE_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("query", pa.string()), ("user_id", pa.string()), ("session_id", pa.string()),
    ("item_id", pa.string()), ("position", pa.int32()), ("source", pa.string()), ("label", pa.string()),
    ("label_rank", pa.int8()), ("rewrites_used", pa.list_(pa.string())),
    ("model_versions", pa.string()), ("event_time", pa.timestamp("us", tz="UTC")),
])
REWRITE_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("query", pa.string()), ("rewrite", pa.string()), ("outcome", pa.string()),
    ("outcome_rank", pa.int8()), ("event_time", pa.timestamp("us", tz="UTC")),
])


def action_field(item_id: str, action: str) -> str:
    return f"{item_id}|{action}"


def label_rows(fields: Mapping[bytes | str, bytes | str], window_s: float) -> tuple[list[dict], list[dict]]:
    """Turn one closed query's hash into example rows and rewrite-outcome rows, counting the
    actions no later than the search's time + ``window_s``."""
    query = orjson.loads(fields[QUERY_FIELD])
    event_time = pd.Timestamp(query["event_time"])
    end_ms = epoch_ms(event_time) + int(window_s * 1000)
    actions: dict[str, int] = {}
    for field, first_ms in fields.items():
        name = field.decode() if isinstance(field, bytes) else field
        if name == QUERY_FIELD or int(first_ms) > end_ms:
            continue
        item_id, action = name.rsplit("|", 1)
        if action in LABEL_OF_ACTION:
            actions[item_id] = max(actions.get(item_id, 0), LABELS.index(LABEL_OF_ACTION[action]))
    common = {"query_id": query["query_id"], "query": query["query"], "event_time": event_time}
    examples = [
        common | {"user_id": query["user_id"], "session_id": query["session_id"], "item_id": served["item_id"],
                  "position": served["position"], "source": served.get("source") or "",
                  "label": LABELS[actions.get(served["item_id"], 0)], "label_rank": actions.get(served["item_id"], 0),
                  "rewrites_used": query["rewrites_used"], "model_versions": orjson.dumps(query["model_versions"]).decode()}
        for served in query["served"]
    ]
    rewrites = []
    for rewrite in query["rewrites_used"]:
        ranks = [actions.get(s["item_id"], 0) for s in query["served"]
                 if (s.get("source") or "") == REWRITE_SOURCE_PREFIX + rewrite]
        best = max(ranks, default=0)
        rewrites.append(common | {"rewrite": rewrite, "outcome": LABELS[best], "outcome_rank": best})
    return examples, rewrites


def _append(root: Path, rows: list[dict], schema: pa.Schema) -> list[Path]:
    if not rows:
        return []
    frame = pd.DataFrame(rows)
    written = []
    for date, part in frame.groupby(frame["event_time"].dt.strftime("%Y-%m-%d")):
        directory = root / f"date={date}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"part-{uuid.uuid4().hex}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False), tmp)
        tmp.rename(path)  # readers never see a half-written file
        written.append(path)
    return written


def append(feedback_dir: Path, closed: Iterable[Mapping[str, bytes | str]], window_s: float) -> tuple[int, int]:
    """Append the rows of closed queries (``label_rows``); returns (examples, rewrite rows) written."""
    examples, rewrites = [], []
    for fields in closed:
        e, r = label_rows(fields, window_s)
        examples += e
        rewrites += r
    _append(feedback_dir / "examples", examples, EXAMPLE_SCHEMA)
    _append(feedback_dir / "rewrites", rewrites, REWRITE_SCHEMA)
    return len(examples), len(rewrites)


def _read(root: Path, schema: pa.Schema, key: list[str]) -> pd.DataFrame:
    files = sorted(root.glob("date=*/*.parquet"))
    if not files:
        return schema.empty_table().to_pandas()
    frame = pd.concat([pq.read_table(f, schema=schema).to_pandas() for f in files], ignore_index=True)
    return frame.drop_duplicates(subset=key, keep="last").sort_values(["event_time", *key], ignore_index=True)


def read_examples(feedback_dir: Path) -> pd.DataFrame:
    return _read(feedback_dir / "examples", EXAMPLE_SCHEMA, ["query_id", "item_id"])


def read_rewrites(feedback_dir: Path) -> pd.DataFrame:
    return _read(feedback_dir / "rewrites", REWRITE_SCHEMA, ["query_id", "rewrite"])
