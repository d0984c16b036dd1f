"""When to stop trusting a query rewrite, from what shoppers did with its results.

Every closed search that used a rewrite yields a paired observation (``RewriteFeedback``): how
many of the page's items came from the rewrite's routes and how many of those were engaged
(clicked, carted or bought), and the same for the original query's routes on the same page.
Summed per (query, rewrite) they give two engagement rates. Each rate gets a Beta posterior
(a uniform Beta(1, 1) prior plus the counts); ``prob_worse`` is the posterior probability that
the rewrite's rate is below the original's, in closed form for integer parameters (a sum of
``1 + engaged`` beta-function terms: tens of microseconds, cheap enough for every search).

The minimum-evidence rule: nothing is judged before the rewrite's routes have shown
``min_shown`` items, so one unlucky search (a few unclicked items) never condemns a rewrite.
Past it, a rewrite is demoted (served after the others) when it is worse with probability
``demote_probability``, and dropped when ``drop_probability``. Retraining later learns the
same lesson from the log; this acts at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import betaln

Verdict = Literal["keep", "demote", "drop"]


@dataclass(frozen=True)
class RouteCounts:
    """Items a route put on pages, and how many of them shoppers engaged with."""

    shown: int = 0
    engaged: int = 0  # clicked, carted or purchased (an item counts once, at its best outcome)
    carts: int = 0
    purchases: int = 0


@dataclass(frozen=True)
class RewriteEvidence:
    rewrite: RouteCounts
    original: RouteCounts


@dataclass(frozen=True)
class EvidenceRule:
    min_shown: int = 30
    demote_probability: float = 0.9
    drop_probability: float = 0.99
    prior: tuple[int, int] = (1, 1)  # integers: the closed form below needs them


def prob_worse(evidence: RewriteEvidence, prior: tuple[int, int] = (1, 1)) -> float:
    """P(rate of the rewrite's routes < rate of the original's) under independent Beta
    posteriors A (rewrite) and B (original): sum over i < a_B of
    B(a_A + i, b_A + b_B) / ((b_B + i) B(1 + i, b_B) B(a_A, b_A)), in log space."""
    r, o = evidence.rewrite, evidence.original
    a_r, b_r = prior[0] + r.engaged, prior[1] + max(0, r.shown - r.engaged)
    a_o, b_o = prior[0] + o.engaged, prior[1] + max(0, o.shown - o.engaged)
    i = np.arange(a_o, dtype=np.float64)
    terms = betaln(a_r + i, b_r + b_o) - np.log(b_o + i) - betaln(1 + i, b_o) - betaln(a_r, b_r)
    return float(min(1.0, max(0.0, np.exp(terms).sum())))


def verdict(evidence: RewriteEvidence, rule: EvidenceRule = EvidenceRule()) -> Verdict:
    if evidence.rewrite.shown < rule.min_shown:
        return "keep"
    p = prob_worse(evidence, rule.prior)
    if p >= rule.drop_probability:
        return "drop"
    return "demote" if p >= rule.demote_probability else "keep"


def order_rewrites(rewrites: Sequence[str], evidence: Mapping[str, RewriteEvidence],
                   rule: EvidenceRule = EvidenceRule()) -> tuple[list[str], dict[str, Verdict]]:
    """The rewrites to serve, kept ones first in their stored order, then the demoted ones;
    dropped ones are left out. Also each judged rewrite's verdict (for the answer and metrics)."""
    verdicts = {r: verdict(evidence[r], rule) for r in rewrites if r in evidence}
    kept = [r for r in rewrites if verdicts.get(r, "keep") == "keep"]
    demoted = [r for r in rewrites if verdicts.get(r) == "demote"]
    return kept + demoted, {r: v for r, v in verdicts.items() if v != "keep"}
