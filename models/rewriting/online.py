"""Stage 3 again, on what shoppers did: the partial order of a query's served rewrites observed
online, for the alignment loop (``tailbridge loop``).

The stream keeps, per (query, rewrite), how many items the rewrite's routes put on pages and
how many of those were engaged (``streams.rewrite_feedback``; ``models.rewrite_evidence``).
Two rewrites of the same query are ordered when the evidence says so: both past the minimum
of items shown, and the posterior probability that one's engagement rate is below the other's
at least the rule's demotion probability (the same Beta posteriors and threshold that demote
a rewrite below the original query). Rewrites without enough evidence, or whose rates the
evidence does not separate, stay incomparable and teach nothing, as in the offline partial
order (``feedback.partial_order``). Each ordered query becomes a ``feedback.Group`` whose
candidates carry their engagement rate as the hit rate (the share of shown items engaged),
so ``align.train_alignment`` trains on it unchanged.

Queries are split by a hash of their key into the ones the loop aligns on and a held-out share
the gate scores (``pair_accuracy``: how often the model's answer likelihood puts the preferred
rewrite first), so the gate never judges a candidate on the pairs it was trained on.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from tailbridge.models.rewrite_evidence import (
    EvidenceRule,
    RewriteEvidence,
    RouteCounts,
    prob_worse,
)
from tailbridge.models.rewriting.bounds import clean_query
from tailbridge.models.rewriting.feedback import Group, Scored


def prefers(better: RouteCounts, worse: RouteCounts, rule: EvidenceRule) -> bool:
    """Whether the evidence says ``better``'s routes engage more than ``worse``'s."""
    if min(better.shown, worse.shown) < rule.min_shown:
        return False
    return prob_worse(RewriteEvidence(worse, better), rule.prior) >= rule.demote_probability


def online_groups(stats: Mapping[str, Mapping[str, RewriteEvidence]], rule: EvidenceRule) -> list[Group]:
    """One group per query whose served rewrites the evidence orders (at least one pair); its
    query is the query key as the worker prompts with it (``bounds.clean_query``)."""
    groups = []
    for query_key in sorted(stats):
        rewrites = sorted(stats[query_key])
        routes = [stats[query_key][r].rewrite for r in rewrites]
        pairs = [(i, j) for i, a in enumerate(routes) for j, b in enumerate(routes) if i != j and prefers(a, b, rule)]
        if pairs:
            rates = [round(c.engaged / c.shown, 4) if c.shown else 0.0 for c in routes]
            query = clean_query(query_key)  # as the worker prompts with it
            groups.append(Group(query, [Scored(r, 0.0, 0.0, rate) for r, rate in zip(rewrites, rates)], pairs))
    return groups


def held_out(query_key: str, fraction: float) -> bool:
    return zlib.crc32(query_key.encode()) % 1000 < fraction * 1000


def split_groups(groups: Sequence[Group], fraction: float) -> tuple[list[Group], list[Group]]:
    """(groups to align on, held-out groups the gate scores)."""
    return ([g for g in groups if not held_out(g.query, fraction)], [g for g in groups if held_out(g.query, fraction)])


def pair_accuracy(generator: Any, groups: Sequence[Group]) -> float | None:
    """Share of the groups' ordered pairs whose preferred rewrite the model scores higher (mean
    answer-token log-likelihood after the rewrite prompt); None without pairs."""
    import torch
    from tailbridge.models.rewriting.losses.bradley_terry import sequence_scores
    from tailbridge.models.rewriting.prompts import prompt
    from tailbridge.models.rewriting.tokens import encode

    right = total = 0
    generator.model.eval()
    for g in groups:
        batch = encode(generator.tokenizer, [prompt("rewrite", g.query)] * len(g.candidates),
                       [c.text for c in g.candidates], generator.device)
        with torch.inference_mode():
            scores = sequence_scores(generator.model, batch).tolist()
        right += sum(scores[w] > scores[lo] for w, lo in g.pairs)
        total += len(g.pairs)
    return round(right / total, 4) if total else None
