"""What the rewriter knows about a query's intent, from the two sources the project has:
graded judgements (BEIR-format ``qrels``) and the feedback log (what shoppers engaged with
after searching that text).

* ``relevant``: judged substitute or better (grade >= 2), plus every engaged item;
* ``engaged``: clicked, carted or bought after a search of the text (the log); for a query the
  log never saw, its exact (grade 3) items stand in, so hit rate is defined on judged data too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tailbridge.vocab import normalize_query

ENGAGED_LABELS = ("clicked", "added_to_cart", "purchased")


@dataclass
class QuerySignals:
    text: str
    stratum: str | None
    judged: dict[str, int] = field(default_factory=dict)  # item -> grade
    logged: set[str] = field(default_factory=set)  # items engaged after searches of this text

    @property
    def relevant(self) -> set[str]:
        return {i for i, g in self.judged.items() if g >= 2} | self.logged

    @property
    def engaged(self) -> set[str]:
        return self.logged or {i for i, g in self.judged.items() if g >= 3}


def engaged_by_text(feedback: Any | None) -> dict[str, set[str]]:
    """Normalised query text -> items engaged after searching it (a feedback-log frame)."""
    if feedback is None or len(feedback) == 0:
        return {}
    rows = feedback[feedback["label"].isin(ENGAGED_LABELS)]
    out: dict[str, set[str]] = {}
    for query, item in zip(rows["query"], rows["item_id"]):
        out.setdefault(normalize_query(str(query)), set()).add(str(item))
    return out


def query_signals(queries: Mapping[str, str], judgements: Mapping[str, Mapping[str, int]],
                  strata: Mapping[str, str], engaged: Mapping[str, set[str]]) -> dict[str, QuerySignals]:
    """Signals of every judged query id."""
    return {qid: QuerySignals(queries[qid], strata.get(qid), dict(judged), set(engaged.get(normalize_query(queries[qid]), ())))
            for qid, judged in judgements.items() if qid in queries}
