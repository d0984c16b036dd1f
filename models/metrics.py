"""Ranking metrics on graded judgements, as trec_eval computes them (linear gain, relevance >= 1).

Unjudged items count as grade 0. ``ranked`` is a list of item ids, best first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def ndcg_at(ranked: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    dcg = sum(max(0, judged.get(d, 0)) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranked: Sequence[str], judged: Mapping[str, int], k: int = 100) -> float:
    relevant = {d for d, g in judged.items() if g >= 1}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr_at(ranked: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    for i, d in enumerate(ranked[:k]):
        if judged.get(d, 0) >= 1:
            return 1.0 / (i + 1)
    return 0.0


def grade_order_accuracy(scores: Mapping[str, float], judged: Mapping[str, int]) -> float | None:
    """Share of judged pairs with different positive grades (exact > substitute > complement)
    that the scores order correctly; ties count half. None if the query has no such pair."""
    items = [(g, scores.get(d, float("-inf"))) for d, g in judged.items() if g >= 1]
    right = pairs = 0.0
    for a, (ga, sa) in enumerate(items):
        for gb, sb in items[a + 1:]:
            if ga == gb:
                continue
            pairs += 1
            hi, lo = (sa, sb) if ga > gb else (sb, sa)
            right += 1.0 if hi > lo else 0.5 if hi == lo else 0.0
    return right / pairs if pairs else None
