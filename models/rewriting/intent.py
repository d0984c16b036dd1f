"""The minimum-relevance rule: a rewrite reaches the store (and so search) only when what it
retrieves still serves the original query's intent.

A generated rewrite can drift to another product ("10 ft high speed hdmi cable" for a
headphones query); fused into the query's results, its routes pull in wrong items and push
right ones out. No judgements exist for a query at fill or stream time, so the rule uses the
query itself as the judge: ``search.ExactSearch.intent`` rates the rewrite's own top 10 by the
query's scores (its dense similarity to each item) against the query's own top 10, and a
rewrite rated below ``min_intent`` (the setting ``rewrite_min_intent``) is dropped. With the
rewrite routes weighted below the query's (``rewrite_route_weight``), what is left can add
items the query's intent rates highly and reorder, but not replace what the query finds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def keep_on_intent(search: Any, queries: Sequence[str], rewrites: Sequence[Sequence[str]],
                   min_intent: float) -> tuple[list[list[str]], int]:
    """Each query's rewrites that pass the rule (order kept) and how many were dropped."""
    todo = [i for i, texts in enumerate(rewrites) if texts]
    kept: list[list[str]] = [list(texts) for texts in rewrites]
    if not todo:
        return kept, 0
    ratios = search.intent([queries[i] for i in todo], [rewrites[i] for i in todo])
    dropped = 0
    for i, scores in zip(todo, ratios):
        kept[i] = [text for text, ratio in zip(rewrites[i], scores) if ratio >= min_intent]
        dropped += len(rewrites[i]) - len(kept[i])
    return kept, dropped
