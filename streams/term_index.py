"""The lexical route beside a vector engine without BM25 (the Milvus 2.3.5 server).

SQLite FTS5, BM25-ranked, one file per item alias under the state dir, opened by every process
that needs it (the indexer writes, query handlers read; WAL mode, so readers never wait for the
writer). It holds what the lexical route returns and filters on: the same text Milvus' BM25
function would analyse (``item_index.rows``), the displayed fields and the filter fields.

Consistency with the vector collection: the indexer writes both for each catalog batch and
commits the batch's Kafka offsets only after both, so a crash between the two writes is
repaired when the batch is replayed (the topic is the outbox). Every write carries a version
(the indexer's write time, the Milvus rows' ``updated_ms``) and a row is only ever replaced
by a newer one; deletes leave a versioned tombstone. So replays are idempotent and a backfill
from Milvus (``reindex``) never resurrects a deleted item or reverts a newer one. Nothing else
writes here: clicks never change an item's lexical score.

Tokens are Unicode letters and digits, case- and accent-folded, unstemmed, as Milvus' default
analyzer; a query word made of several tokens ("WH-1000XM4", "10.5") also counts as the exact
sequence, so model numbers and sizes rank the items that carry them exactly first.

FTS5 scores every document that matches any query term (no top-k pruning), so a long query
with words such as "in", "for", "a" scored half the catalog (370 ms at 50,000 items on a loaded
machine). So a query keeps only its ``MAX_TERMS`` rarest tokens, none of them in more than
``COMMON_SHARE`` of the documents unless all are (the rest weigh little in BM25: idf 3 at 5%,
against 8 and more for a rare term), which bounds the work by the rare terms' documents; the
ranking of the documents that match the rare terms changes only by the left-out terms' small
contribution. Multi-token words always stay as phrases.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailbridge.settings import Settings

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    rid INTEGER PRIMARY KEY,          -- the FTS rowid of the item's text
    item_id TEXT NOT NULL UNIQUE,
    version INTEGER NOT NULL,         -- a write older than this never replaces the row
    deleted INTEGER NOT NULL DEFAULT 0,
    title TEXT NOT NULL DEFAULT '', brand TEXT NOT NULL DEFAULT '', category TEXT NOT NULL DEFAULT '',
    category_path TEXT NOT NULL DEFAULT '', price REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS items_category ON items(category);
CREATE INDEX IF NOT EXISTS items_brand ON items(brand);
CREATE VIRTUAL TABLE IF NOT EXISTS terms USING fts5(text, tokenize = 'unicode61 remove_diacritics 2');
"""
FIELDS = ("item_id", "title", "brand", "category", "category_path", "price")
COMMON_SHARE = 0.05
MAX_TERMS = 4
DOC_COUNT_TTL_S = 10.0
MAX_COUNTED_TERMS = 100_000  # document frequencies kept between recounts
_WORD = re.compile(r"\S+")
_TOKEN = re.compile(r"[^\W_]+")  # what unicode61 keeps: letters and digits; the rest separates


def path_for(settings: Settings, alias: str) -> Path:
    return settings.state_dir / "terms" / f"{alias}.sqlite"


@dataclass(frozen=True)
class TermFilters:
    """The search filters, as SQL over the items table (values always bound, never spliced)."""

    category: str | None = None
    brand: str | None = None
    price_min: float | None = None
    price_max: float | None = None

    def sql(self) -> tuple[str, list[Any]]:
        clauses, params = [], []
        for column, op, value in (("category", "=", self.category), ("brand", "=", self.brand),
                                  ("price", ">=", self.price_min), ("price", "<=", self.price_max)):
            if value is not None:
                clauses.append(f"i.{column} {op} ?")
                params.append(value)
        return "".join(f" AND {c}" for c in clauses), params


def tokens(text: str) -> list[list[str]]:
    """The tokens of each whitespace-separated word."""
    return [t for t in (_TOKEN.findall(word) for word in _WORD.findall(text.lower())) if t]


def match_query(text: str, common: frozenset[str] = frozenset()) -> str | None:
    """The FTS5 query for a search text: any of its tokens but the ``common`` ones, plus each
    multi-token word as a phrase (the exact sequence scores as a term of its own). None when
    it has no token."""
    terms: list[str] = []
    for word in tokens(text):
        if len(word) > 1:
            terms.append('"' + " ".join(word) + '"')
        terms += [f'"{token}"' for token in word if token not in common]
    unique = list(dict.fromkeys(terms))
    return " OR ".join(unique) if unique else None


class TermIndex:
    """One SQLite file; a connection per thread (sqlite3 connections are not shared)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._counted: tuple[float, int, dict[str, int]] = (-DOC_COUNT_TTL_S, 0, {})  # (when, documents, term -> documents)
        with self._conn() as conn:
            conn.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a power loss may drop the last commits, replay restores them
            conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.vocab USING fts5vocab(main, terms, row)")
            self._local.conn = conn
        return conn

    def upsert(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Rows as ``item_index.rows`` makes them (``text``, ``updated_ms`` and the fields);
        returns how many replaced an older version. One transaction: all or nothing."""
        return self._write([(row, False) for row in rows])

    def delete(self, item_ids: Iterable[str], version: int) -> int:
        return self._write([({"item_id": item_id, "updated_ms": version}, True) for item_id in item_ids])

    def _write(self, writes: Sequence[tuple[Mapping[str, Any], bool]]) -> int:
        conn, changed = self._conn(), 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for row, deleted in writes:
                found = conn.execute("SELECT rid, version, deleted FROM items WHERE item_id = ?",
                                     (row["item_id"],)).fetchone()
                if found and found[1] > row["updated_ms"]:
                    continue  # a newer write is already here
                if found:
                    if not found[2]:
                        conn.execute("DELETE FROM terms WHERE rowid = ?", (found[0],))
                    conn.execute("DELETE FROM items WHERE rid = ?", (found[0],))
                values = [row.get(f, "" if f != "price" else 0.0) for f in FIELDS]
                cur = conn.execute(f"INSERT INTO items ({', '.join(FIELDS)}, version, deleted) VALUES "
                                   f"({', '.join('?' * len(FIELDS))}, ?, ?)", [*values, row["updated_ms"], int(deleted)])
                if not deleted:
                    conn.execute("INSERT INTO terms (rowid, text) VALUES (?, ?)", (cur.lastrowid, row["text"]))
                changed += 1
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return changed

    def search(self, texts: Sequence[str], limit: int, filters: TermFilters = TermFilters()) -> list[list[dict]]:
        """BM25 hits per text, best first, shaped as pymilvus search hits (``id``, ``distance``:
        higher is better, ``entity``: the fields).

        The matches are scored once (``hits``), and only those scoring at least the ``limit``-th
        best score are joined to their fields and sorted by (score, item id): the same rows in
        the same order as sorting every match with its fields, ties at the cut included, at
        about two thirds of the CPU on the 50,000-item demo catalog (the join and the sorter
        carried every match's fields). Without filters the scoring reads the FTS table alone
        (every text in it is a live item's: deletes remove it)."""
        where, params = filters.sql()
        scored = " JOIN items i ON i.rid = terms.rowid" if where else ""
        sql = (f"WITH hits AS MATERIALIZED (SELECT terms.rowid AS rid, -bm25(terms) AS score FROM terms{scored} "
               f"WHERE terms MATCH ?{where}), "
               "cut AS (SELECT min(score) AS score FROM (SELECT score FROM hits ORDER BY score DESC LIMIT ?)) "
               f"SELECT {', '.join('i.' + f for f in FIELDS)}, hits.score FROM hits JOIN items i ON i.rid = hits.rid, cut "
               "WHERE hits.score >= cut.score ORDER BY hits.score DESC, i.item_id LIMIT ?")
        out = []
        for text in texts:
            query = match_query(text, self._common(text))
            rows = self._conn().execute(sql, [query, *params, limit, limit]).fetchall() if query else []
            out.append([{"id": row[0], "distance": row[-1], "entity": dict(zip(FIELDS, row[:-1]))} for row in rows])
        return out

    def _common(self, text: str) -> frozenset[str]:
        """The tokens a search leaves out: all but the MAX_TERMS rarest, and those in more
        than COMMON_SHARE of the documents, unless all are."""
        unique = sorted({token for word in tokens(text) for token in word})
        if len(unique) < 2:
            return frozenset()
        docs, frequency = self._counts(unique)
        rarest = sorted(unique, key=lambda t: frequency.get(t, 0))
        kept = [t for t in rarest[:MAX_TERMS] if frequency.get(t, 0) <= COMMON_SHARE * docs] or rarest[:MAX_TERMS]
        return frozenset(unique) - set(kept)

    def _counts(self, unique: Sequence[str]) -> tuple[int, dict[str, int]]:
        """The live documents and each token's document frequency, both counted at most
        DOC_COUNT_TTL_S ago: fts5vocab counts a term by walking its whole posting list (0.6 ms
        of CPU per query at 50,000 items), and search's tokens repeat (head queries, "for",
        colours), so the counts are kept for as long as the document count already was."""
        counted, docs, frequency = self._counted
        if time.monotonic() - counted > DOC_COUNT_TTL_S or len(frequency) > MAX_COUNTED_TERMS:
            counted, docs, frequency = time.monotonic(), self.count(), {}
            self._counted = (counted, docs, frequency)  # one tuple: a thread never sees a half-reset cache
        missing = [t for t in unique if t not in frequency]
        if missing:
            found = dict(self._conn().execute(
                f"SELECT term, doc FROM temp.vocab WHERE term IN ({', '.join('?' * len(missing))})", missing).fetchall())
            frequency.update({t: found.get(t, 0) for t in missing})
        return docs, frequency

    def versions(self) -> dict[str, tuple[int, bool]]:
        """item id -> (version, deleted), for checks and repairs."""
        return {item_id: (version, bool(deleted)) for item_id, version, deleted in
                self._conn().execute("SELECT item_id, version, deleted FROM items")}

    def count(self) -> int:
        return self._conn().execute("SELECT count(*) FROM items WHERE deleted = 0").fetchone()[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
