"""Stage 2, offline feedback: beam search proposes N candidate rewrites per query, each is run
through the search the handler runs (``search.ExactSearch``) and scored, and the scores give a
partial order of the candidates.

Scores of a candidate (its own route, top 100, against the query's ``signals``):

* relevance -- precision@10: how much of what the rewrite retrieves first serves the original
  query's intent (relevant = judged substitute or better, or engaged);
* increment -- the original query's relevant items the rewrite retrieves that the query alone
  does not, as a share of the relevant items;
* hit rate -- the share of the query's engaged items (the log; judged exact items where the log
  has none) that the rewrite retrieves.

Candidate a is better than b when it is at least as good on all three and better on one
(Pareto dominance): a partial order; incomparable pairs teach nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tailbridge.models.rewriting.generator import Generator
from tailbridge.models.rewriting.signals import QuerySignals

SCORES = ("relevance", "increment", "hit_rate")


@dataclass
class Scored:
    text: str
    relevance: float
    increment: float
    hit_rate: float

    def values(self) -> tuple[float, float, float]:
        return self.relevance, self.increment, self.hit_rate


@dataclass
class Group:
    """One query's candidates, their scores and the partial order as (better, worse) indices."""

    query: str
    candidates: list[Scored]
    pairs: list[tuple[int, int]] = field(default_factory=list)

    @property
    def best(self) -> int:
        """The candidate that beats the most others (ties: the larger score sum, then beam order)."""
        wins = [sum(1 for w, _ in self.pairs if w == i) for i in range(len(self.candidates))]
        return max(range(len(self.candidates)), key=lambda i: (wins[i], sum(self.candidates[i].values()), -i))


def score(signals: QuerySignals, base: Sequence[str], retrieved: Sequence[str], text: str) -> Scored:
    rel, engaged = signals.relevant, signals.engaged
    top10 = list(retrieved)[:10]
    relevance = sum(1 for i in top10 if i in rel) / 10
    increment = len(rel.intersection(retrieved) - set(base)) / len(rel) if rel else 0.0
    hit = len(engaged.intersection(retrieved)) / len(engaged) if engaged else 0.0
    return Scored(text, round(relevance, 4), round(increment, 4), round(hit, 4))


def dominates(a: Scored, b: Scored) -> bool:
    return all(x >= y for x, y in zip(a.values(), b.values())) and a.values() != b.values()


def partial_order(candidates: Sequence[Scored]) -> list[tuple[int, int]]:
    return [(i, j) for i, a in enumerate(candidates) for j, b in enumerate(candidates) if i != j and dominates(a, b)]


def collect(generator: Generator, signals: Mapping[str, QuerySignals], qids: Sequence[str], search: Any,
            candidates: int = 4) -> list[Group]:
    """Beam-search ``candidates`` rewrites for each query, score them, order them; queries with
    fewer than two candidates or no ordered pair are dropped (nothing to prefer)."""
    texts = [signals[q].text for q in qids]
    proposals = generator.rewrite(texts, n=candidates, beams=candidates)
    base = search.ranked([[t] for t in texts])
    retrieved = search.ranked([[c] for cands in proposals for c in cands])
    groups, cursor = [], 0
    for qid, cands, b in zip(qids, proposals, base):
        scored = [score(signals[qid], b, retrieved[cursor + k], c) for k, c in enumerate(cands)]
        cursor += len(cands)
        group = Group(signals[qid].text, scored, partial_order(scored))
        if len(scored) >= 2 and group.pairs:
            groups.append(group)
    return groups


def mean_scores(groups_or_scored: Sequence[Scored]) -> dict[str, float]:
    n = max(len(groups_or_scored), 1)
    return {name: round(sum(getattr(s, name) for s in groups_or_scored) / n, 4) for name in SCORES}
